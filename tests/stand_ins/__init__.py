"""Stand-ins for services that cannot run on the development machine (named as such)."""
