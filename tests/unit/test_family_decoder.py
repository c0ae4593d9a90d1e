"""The GPT-style decoder family on tiny random GPT-2 and Llama folders in their real formats:
detection, width, pad token, last-token pooling under both paddings, LoRA on the family's
default targets, a probe and a fine-tune that learn, causal-LM domain adaptation, saving."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import save_tiny_bert
from tests.families.tiny_decoder import (
    HIDDEN,
    save_tiny_gpt2,
    save_tiny_llama,
    synthetic_texts,
)
from transferkit.backbones import BackboneInfo
from transferkit.backbones.base import detect, family_of, read_config
from transferkit.backbones.decoder import (
    DECODER_TYPES,
    DecoderFamily,
    decoder_blocks,
    hidden_size,
    is_decoder,
    num_layers,
    set_pad_token,
)
from transferkit.backbones.text import pad, run_batched, tokenize
from transferkit.config import DomainAdaptationConfig, StorageConfig
from transferkit.errors import BackboneError, DataError, TrainingError
from transferkit.training.causal import adapt_causal_lm

FAMILY = DecoderFamily()


@dataclass
class Settings:
    pooling: str = "last"
    normalize: bool = False
    max_length: int = 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {
        "gpt2": save_tiny_gpt2(root / "gpt2"),
        "llama": save_tiny_llama(root / "llama"),
    }


@pytest.fixture(scope="module")
def task() -> dict[str, Any]:
    train, train_y = synthetic_texts(300, 1)
    test, test_y = synthetic_texts(200, 2)
    return {"train": train, "train_y": train_y, "test": test, "test_y": test_y}


@pytest.fixture(scope="module")
def first_task() -> dict[str, Any]:
    """The label is the first keyword: frozen last-token features do not hold it."""
    train, train_y = synthetic_texts(300, 1, first=True)
    test, test_y = synthetic_texts(200, 2, first=True)
    return {"train": train, "train_y": train_y, "test": test, "test_y": test_y}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny models gain nothing from threads; on a busy machine they lose much to them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()]


def test_every_listed_model_type_is_one_transformers_knows() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    assert sorted(DECODER_TYPES - set(CONFIG_MAPPING_NAMES)) == []


@pytest.mark.parametrize(
    ("name", "targets"), [("gpt2", ("c_attn",)), ("llama", ("q_proj", "v_proj"))]
)
def test_gpt2_and_llama_folders_are_decoders(
    folders: dict[str, Path], name: str, targets: tuple[str, ...]
) -> None:
    folder = folders[name]
    family = detect(read_config(folder), files(folder), str(folder))
    assert family.name == "decoder"
    assert family_of("decoder") is family
    assert family.default_pooling(folder) == ("last", False)
    capabilities = family.capabilities("text", read_config(folder))
    assert capabilities.lora_targets == targets
    assert capabilities.adaptation == "clm"
    assert capabilities.zero_shot
    assert capabilities.contrastive
    assert capabilities.finetune


def test_encoders_and_folders_without_a_tokenizer_are_not_decoders(
    tmp_path: Path, minilm_dir: Path, folders: dict[str, Path]
) -> None:
    bert = save_tiny_bert(tmp_path / "bert", minilm_dir)
    assert detect(read_config(bert), files(bert), str(bert)).name == "encoder"
    # Encoders saved with a causal-LM head are still encoders; encoder-decoders are not ours.
    assert not is_decoder({"model_type": "bert", "architectures": ["BertLMHeadModel"]})
    assert not is_decoder({"model_type": "roberta", "architectures": ["RobertaForCausalLM"]})
    assert not is_decoder(
        {"model_type": "bart", "architectures": ["BartForCausalLM"], "is_encoder_decoder": True}
    )
    assert not is_decoder({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]})
    # A causal LM transformers lists under a type we do not name is known by its architecture.
    assert is_decoder({"model_type": "newlm", "architectures": ["NewLmForCausalLM"]})
    no_tokenizer = {"config.json", "model.safetensors"}
    assert not FAMILY.detect(read_config(folders["gpt2"]), no_tokenizer)


def test_hidden_size_and_depth_read_each_configs_own_key(folders: dict[str, Path]) -> None:
    assert hidden_size(read_config(folders["gpt2"])) == HIDDEN  # n_embd
    assert FAMILY.feature_size(read_config(folders["gpt2"]), "text") == HIDDEN
    assert "hidden_size" not in read_config(folders["gpt2"])
    assert hidden_size(read_config(folders["llama"])) == HIDDEN
    assert hidden_size({"model_type": "mpt", "d_model": 2048}) == 2048
    # OPT-350m projects its 1024-wide states to 512 on the way out.
    opt = {"model_type": "opt", "hidden_size": 1024, "word_embed_proj_dim": 512}
    assert hidden_size(opt) == 512
    assert FAMILY.feature_size(opt, "text") == 512
    assert hidden_size({"model_type": "mystery"}) == 0
    assert num_layers(read_config(folders["gpt2"])) == 2  # n_layer
    assert num_layers({"n_layers": 3}) == 3
    for name in ("gpt2", "llama"):
        tokenizer, encoder = FAMILY.load(folders[name], "text", Settings())
        vectors = run_batched(encoder, tokenizer, ["the apple", "a boat"], 64)
        assert encoder.hidden_size == vectors.shape[1] == HIDDEN
        assert len(encoder.blocks()) == 2


def test_the_block_stack_is_the_outer_list() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(8))

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(3))

    body = Body()
    assert decoder_blocks(body) == list(body.layers)


def test_a_folder_missing_a_weight_or_with_broken_weights_is_refused_in_one_line(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "llama"
    shutil.copytree(folders["llama"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BackboneError, match=r"weights have no layers\.1\.mlp\.down_proj") as error:
        FAMILY.load(folder, "text", Settings())
    assert "\n" not in str(error.value)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BackboneError, match=r"its weights do not load .*fetch it again"):
        FAMILY.load(folder, "text", Settings())


def test_the_pad_token_is_one_the_tokenizer_has(folders: dict[str, Path]) -> None:
    for name, stand_in in (("gpt2", "<|endoftext|>"), ("llama", "</s>")):
        tokenizer, encoder = FAMILY.load(folders[name], "text", Settings())
        assert tokenizer.pad_token == stand_in
        vocab = read_config(folders[name])["vocab_size"]
        assert encoder.body.get_input_embeddings().num_embeddings == vocab == len(tokenizer)

    class Bare:
        pad_token = eos_token = None
        unk_token = "<unk>"

    assert set_pad_token(Bare()).pad_token == "<unk>"
    Bare.unk_token = None
    assert set_pad_token(Bare()).pad_token is None


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_text_alone_equals_it_in_a_right_or_left_padded_batch(
    folders: dict[str, Path], task: dict[str, Any], name: str
) -> None:
    tokenizer, encoder = FAMILY.load(folders[name], "text", Settings())
    texts = ["apple", *task["test"][:7]]  # one short text among long ones: much padding
    alone = np.stack([run_batched(encoder, tokenizer, [t], 64)[0] for t in texts])
    right = run_batched(encoder, tokenizer, texts, 64, batch_size=8)
    np.testing.assert_allclose(right, alone, atol=1e-5)
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][0, 0] == 0).item()  # really padded on the left
    with torch.inference_mode():
        left = encoder(batch["input_ids"], batch["attention_mask"]).numpy()
        # Without positions counted from the first real token, left padding shifts them.
        shifted = encoder.body(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state[:, -1]
    np.testing.assert_allclose(left, alone, atol=1e-5)
    assert (np.abs(shifted.numpy()[0] - alone[0]).max() > 1e-3) == (name == "gpt2")


def test_last_token_pooling_is_not_the_mean(folders: dict[str, Path]) -> None:
    texts = ["the apple was here", "a boat"]
    tokenizer, encoder = FAMILY.load(folders["llama"], "text", Settings())
    last = run_batched(encoder, tokenizer, texts, 64)
    encoder.pooling = "mean"
    mean = run_batched(encoder, tokenizer, texts, 64)
    # Every text's vector differs (not just one), and by more than rounding.
    assert np.abs(last - mean).max(axis=1).min() > 0.1


def probe_accuracy(folder: Path, task: dict[str, Any], pooling: str) -> float:
    from sklearn.linear_model import LogisticRegression

    tokenizer, encoder = FAMILY.load(folder, "text", Settings(pooling=pooling))
    x = run_batched(encoder, tokenizer, task["train"], 64)
    test_x = run_batched(encoder, tokenizer, task["test"], 64)
    probe = LogisticRegression(max_iter=2000).fit(x, task["train_y"])
    return float(probe.score(test_x, task["test_y"]))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_probe_on_last_token_features_learns_what_the_mean_cannot(
    folders: dict[str, Path], task: dict[str, Any], name: str
) -> None:
    # The label is the later of two keywords: only the last token has read them in order.
    last = probe_accuracy(folders[name], task, "last")
    mean = probe_accuracy(folders[name], task, "mean")
    print(f"{name}: probe accuracy last {last:.3f}, mean {mean:.3f}")
    assert last >= 0.95
    assert mean <= 0.8


def train_classifier(
    encoder: nn.Module, tokenizer: Any, task: dict[str, Any], steps: int, lr: float
) -> nn.Module:
    """Encoder plus a linear head, trained with AdamW on batches of 32 training texts."""
    head = nn.Linear(HIDDEN, 2)
    trainable = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    ids = tokenize(tokenizer, task["train"], 64)
    rng = np.random.default_rng(0)
    encoder.train()
    for _ in range(steps):
        rows = rng.choice(len(ids), 32, replace=False)
        logits = head(encoder(*pad([ids[i] for i in rows], tokenizer.pad_token_id)))
        loss = nn.functional.cross_entropy(logits, torch.as_tensor(task["train_y"][rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    return head


def accuracy(encoder: nn.Module, head: nn.Module, tokenizer: Any, task: dict[str, Any]) -> float:
    vectors = run_batched(encoder, tokenizer, task["test"], 64)
    with torch.no_grad():
        predicted = head(torch.from_numpy(vectors)).argmax(dim=1).numpy()
    return float((predicted == task["test_y"]).mean())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_lora_on_the_family_targets_learns_and_merges(
    folders: dict[str, Path], first_task: dict[str, Any], name: str
) -> None:
    task = first_task
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tokenizer, encoder = FAMILY.load(folders[name], "text", Settings())
    original = {k: v.clone() for k, v in encoder.body.state_dict().items()}
    targets = FAMILY.capabilities("text", read_config(folders[name])).lora_targets
    encoder.body = get_peft_model(
        encoder.body, LoraConfig(r=8, lora_alpha=16, target_modules=list(targets))
    )
    adapted = [n for n, _ in encoder.body.named_modules() if n.endswith(targets)]
    assert len(adapted) == 2 * len(targets)  # each target in each of the 2 blocks
    if name == "gpt2":  # a Conv1D: PEFT found its weight stored transposed
        assert encoder.body.peft_config["default"].fan_in_fan_out
    assert encoder.hidden_size == HIDDEN  # read through the PEFT wrapper
    head = train_classifier(encoder, tokenizer, task, steps=100, lr=1e-2)
    unmerged = run_batched(encoder, tokenizer, task["test"][:16], 64)
    tuned = accuracy(encoder, head, tokenizer, task)
    encoder.body = encoder.body.merge_and_unload()
    merged = run_batched(encoder, tokenizer, task["test"][:16], 64)
    np.testing.assert_allclose(merged, unmerged, atol=1e-5)
    state = encoder.body.state_dict()
    assert set(state) == set(original)  # a plain model again, no adapter keys
    moved = {k.rsplit(".", 2)[-2] for k in state if not torch.equal(state[k], original[k])}
    assert moved == set(targets)
    frozen = probe_accuracy(folders[name], task, "last")
    print(f"{name}: LoRA test accuracy {tuned:.3f}, frozen probe {frozen:.3f}")
    assert frozen <= 0.8
    assert tuned >= 0.85


def test_full_finetune_learns_what_frozen_features_miss(
    folders: dict[str, Path], first_task: dict[str, Any]
) -> None:
    torch.manual_seed(0)
    tokenizer, encoder = FAMILY.load(folders["gpt2"], "text", Settings())
    head = train_classifier(encoder, tokenizer, first_task, steps=100, lr=1e-3)
    tuned = accuracy(encoder, head, tokenizer, first_task)
    frozen = probe_accuracy(folders["gpt2"], first_task, "last")
    print(f"full fine-tune test accuracy {tuned:.3f}, frozen probe {frozen:.3f}")
    assert frozen <= 0.8
    assert tuned >= 0.95


def backbone(tmp_path: Path, folder: Path) -> tuple[Path, BackboneInfo]:
    shutil.copytree(folder, tmp_path / "backbone" / "model")
    info = BackboneInfo(
        source=str(folder),
        architecture=read_config(folder)["architectures"][0],
        model_type=read_config(folder)["model_type"],
        hidden_size=0,  # what fetch records for GPT-2 today
        num_layers=2,
        parameters=0,
        weights={},
        fingerprint="original",
        pooling="last",
        normalize=False,
        max_length=64,
    )
    return tmp_path / "backbone", info


def corpus(tmp_path: Path, count: int = 400) -> str:
    path = tmp_path / "unlabelled.txt"
    path.write_text("\n".join(synthetic_texts(count, 7)[0]) + "\n")
    return str(path)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_causal_lm_adaptation_lowers_the_held_out_loss_and_reloads(
    tmp_path: Path, folders: dict[str, Path], name: str
) -> None:
    backbone_dir, info = backbone(tmp_path, folders[name])
    strategy = DomainAdaptationConfig(
        unlabelled_uri=corpus(tmp_path), steps=60, batch_size=16, learning_rate=3e-3
    )
    record = adapt_causal_lm(
        strategy, StorageConfig(), backbone_dir, info, tmp_path / "out", "fp32", 0,
        torch.device("cpu"),
    )  # fmt: skip
    print(name, record)
    assert record["objective"] == "clm"
    assert record["head_warmup_steps"] == 0
    assert record["held_out_texts"] == 20
    assert record["unlabelled_texts"] == 400
    # Random weights predict about uniformly, log(vocab) nats; the corpus' words are few.
    assert record["held_out_clm_loss_before"] > 0.9 * math.log(
        read_config(folders[name])["vocab_size"]
    )
    assert record["held_out_clm_loss_after"] < record["held_out_clm_loss_before"] - 0.75
    adapted = tmp_path / "out" / "model"
    written = json.loads((tmp_path / "out" / "backbone.json").read_text())
    assert written["hidden_size"] == HIDDEN
    assert written["fingerprint"] not in ("original", info.fingerprint)
    assert set(written["weights"]) == {"model.safetensors"}
    assert written["num_layers"] == 2
    from transferkit import storage

    assert written["fingerprint"] == storage.sha256_tree(adapted)
    assert written["weights"]["model.safetensors"] == storage.sha256_file(
        adapted / "model.safetensors"
    )
    if "files" in BackboneInfo.model_fields:  # records that keep every file's hash
        assert written["files"] == {
            p.name: storage.sha256_file(p) for p in adapted.iterdir() if p.is_file()
        }
    # The causal-LM layout, read back by AutoModel (through the family) without a missing key.
    from transformers import AutoModel

    _, loading = AutoModel.from_pretrained(adapted, output_loading_info=True)
    assert not loading["missing_keys"]
    assert detect(read_config(adapted), files(adapted), str(adapted)).name == "decoder"
    tokenizer, encoder = FAMILY.load(adapted, "text", Settings())
    _, original = FAMILY.load(folders[name], "text", Settings())
    texts = synthetic_texts(4, 3)[0]
    assert (
        np.abs(
            run_batched(encoder, tokenizer, texts, 64) - run_batched(original, tokenizer, texts, 64)
        ).max()
        > 1e-3
    )


def test_a_decoder_saved_without_its_lm_head_gets_one_warmed_up_first(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    from transformers import AutoModel

    bare = tmp_path / "bare"
    AutoModel.from_pretrained(folders["llama"]).save_pretrained(bare)  # LlamaModel: no lm_head
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(folders["llama"] / name, bare / name)
    backbone_dir, info = backbone(tmp_path, bare)
    uri = corpus(tmp_path, 200)
    refused = DomainAdaptationConfig(unlabelled_uri=uri, steps=5, head_warmup_steps=0)
    with pytest.raises(TrainingError, match=r"no LM head.*head_warmup_steps") as error:
        adapt_causal_lm(
            refused, StorageConfig(), backbone_dir, info, tmp_path / "a", "fp32", 0,
            torch.device("cpu"),
        )  # fmt: skip
    assert "\n" not in str(error.value)
    assert not (tmp_path / "a").exists()
    strategy = DomainAdaptationConfig(
        unlabelled_uri=uri, steps=20, head_warmup_steps=30, batch_size=16, learning_rate=3e-3,
        head_learning_rate=1e-2,
    )  # fmt: skip
    record = adapt_causal_lm(
        strategy, StorageConfig(), backbone_dir, info, tmp_path / "b", "fp32", 0,
        torch.device("cpu"),
    )  # fmt: skip
    assert record["head_warmup_steps"] == 30
    assert record["held_out_clm_loss_after"] < record["held_out_clm_loss_before"]


def test_a_corpus_of_one_token_texts_is_refused_in_one_line(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    backbone_dir, info = backbone(tmp_path, folders["gpt2"])
    path = tmp_path / "short.txt"
    path.write_text("a\n" * 40 + "the apple\n" * 10)
    strategy = DomainAdaptationConfig(unlabelled_uri=str(path), steps=5)
    with pytest.raises(
        DataError, match=r"short\.txt: 10 unlabelled texts are longer than one token.* at least 20"
    ):
        adapt_causal_lm(
            strategy, StorageConfig(), backbone_dir, info, tmp_path / "out", "fp32", 0,
            torch.device("cpu"),
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_save_and_load_round_trip(tmp_path: Path, folders: dict[str, Path]) -> None:
    tokenizer, encoder = FAMILY.load(folders["gpt2"], "text", Settings())
    with torch.no_grad():
        weight = encoder.body.h[1].mlp.c_fc.weight  # a trained encoder differs from its source
        weight.add_(torch.randn_like(weight))
    texts = synthetic_texts(6, 4)[0]
    before = run_batched(encoder, tokenizer, texts, 64)
    FAMILY.save(encoder, tokenizer, folders["gpt2"], tmp_path / "saved")
    saved = tmp_path / "saved"
    assert detect(read_config(saved), files(saved), str(saved)).name == "decoder"
    tokenizer2, encoder2 = FAMILY.load(saved, "text", Settings())
    assert tokenizer2.pad_token == "<|endoftext|>"
    np.testing.assert_allclose(run_batched(encoder2, tokenizer2, texts, 64), before, atol=1e-6)
    _, source = FAMILY.load(folders["gpt2"], "text", Settings())
    assert np.abs(run_batched(source, tokenizer, texts, 64) - before).max() > 1e-3


def test_random_init_and_prompt_encoder(folders: dict[str, Path]) -> None:
    torch.manual_seed(1)
    _, fresh = FAMILY.load(folders["llama"], "text", Settings(), random_init=True)
    _, loaded = FAMILY.load(folders["llama"], "text", Settings())
    assert not torch.equal(
        fresh.body.layers[0].self_attn.q_proj.weight, loaded.body.layers[0].self_attn.q_proj.weight
    )
    tokenizer, prompts = FAMILY.prompt_encoder(folders["llama"], "text", Settings())
    vectors = run_batched(prompts, tokenizer, ["a fruit", "a vehicle"], 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
