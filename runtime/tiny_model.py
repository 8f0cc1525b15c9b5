"""The built-in tiny model: a real Llama-architecture model vLLM serves, made locally.

No model can be downloaded on the machines fastvllm is tested on, so the demo and the tests
make one: seeded random bf16 weights and a byte-level BPE tokenizer trained on a seeded
synthetic corpus. The output is byte-identical across runs (the tests check it), so two
machines that make it get the same model, the same content hash, the same greedy tokens.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastvllm.runtime import system

TINY_NAME = "tiny"
TINY_VERSION = "2"
SEED = 20261121

CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
SPECIAL = ["<unk>", "<s>", "</s>"]
# Larger than the usual 0.02 so that greedy output depends on the context and differs from
# prompt to prompt: identical tokens after a restore then mean something.
INIT_STD = 0.25

_WORDS = """
the a of to and in is was for on that with as by at from it an be this which or are were his her
their its had has have not but all when one would there been who more will if no out so can said
what up about into than them some could time only new these two may first then do any like my
now over such our man me even most made after also did many before must through back years where
much your way well down should because each just those people how too little state good very
make world still own see men work long get here between both life being under never day same
another know while last might us great old year off come since against go came right used take
three light house keeper morning cold sea ship lamp storm night river city history king queen
garden machine server model token cache memory restore
""".split()  # noqa: SIM905 (a word list reads best as text)


# Larger siblings of the tiny model, same tokenizer and structure: "small" (~190 MB) shows
# what sleeping releases when weights matter; "3b" has Llama-3.2-3B's layer shapes (but the
# tiny model's 2048-token vocabulary, so 5.6 GB rather than 6.4) for GPU runs.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
              "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128},
    # Llama-3.1-8B's layer shapes with the tiny vocabulary: 14.0 GB rather than 16.1
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
}  # fmt: skip
# Sizes whose weights come from `_write_fast` (random bits written by all cores) instead of a
# generator's normal draws: 14 GB of normals and safetensors' own serialisation take minutes.
FAST_SIZES = frozenset({"8b"})


def default_dir(size: str = TINY_NAME) -> Path:
    home = system.fastvllm_home()
    name = f"tiny-llama-v{TINY_VERSION}" if size == TINY_NAME else f"{size}-llama-v{TINY_VERSION}"
    return home / "models" / name


_SYLLABLES = "ka lo mi ren tas vor eli un dra pe si mon tor ga li ver an sto bel qui ro na fe zu".split()  # noqa: SIM905


def _corpus(n_sentences: int = 6000) -> list[str]:
    """English-ish words plus seeded pseudo-words, enough variety for a full BPE vocabulary."""
    rng = random.Random(SEED)
    pseudo = ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(3000)]
    vocab = _WORDS + pseudo
    out = []
    for _ in range(n_sentences):
        words = rng.choices(vocab, k=rng.randint(5, 16))
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ","]))
    return out


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str(pretty=True)


def config(size: str = TINY_NAME) -> dict[str, object]:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {', '.join(SIZES)}")
    return {**CONFIG, **SIZES[size]}


def _weights(c: dict[str, Any]) -> dict[str, Any]:
    import torch

    # The larger sizes are drawn on a GPU when there is one (seconds instead of a minute for
    # 3b); the tiny model always on the CPU, so that it is byte-identical everywhere.
    big = c["hidden_size"] != CONFIG["hidden_size"] and torch.cuda.is_available()
    dev = "cuda" if big else "cpu"
    g = torch.Generator(device=dev).manual_seed(SEED)
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=dev) * INIT_STD).to(torch.bfloat16).cpu()

    w: dict[str, object] = {"model.embed_tokens.weight": rnd(v, h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "self_attn.q_proj.weight"] = rnd(q, h)
        w[p + "self_attn.k_proj.weight"] = rnd(kv, h)
        w[p + "self_attn.v_proj.weight"] = rnd(kv, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, q)
        w[p + "mlp.gate_proj.weight"] = rnd(i, h)
        w[p + "mlp.up_proj.weight"] = rnd(i, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, i)
        w[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    w["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    w["lm_head.weight"] = rnd(v, h)
    return w


def shapes(c: dict[str, Any]) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape, random?) of every weight, in `_weights`' order; not random: ones (norms)."""
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    out: list[tuple[str, tuple[int, ...], bool]] = [("model.embed_tokens.weight", (v, h), True)]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (q, h), True),
            (p + "self_attn.k_proj.weight", (kv, h), True),
            (p + "self_attn.v_proj.weight", (kv, h), True),
            (p + "self_attn.o_proj.weight", (h, q), True),
            (p + "mlp.gate_proj.weight", (i, h), True),
            (p + "mlp.up_proj.weight", (i, h), True),
            (p + "mlp.down_proj.weight", (h, i), True),
            (p + "input_layernorm.weight", (h,), False),
            (p + "post_attention_layernorm.weight", (h,), False),
        ]
    return [*out, ("model.norm.weight", (h,), False), ("lm_head.weight", (v, h), True)]


def weight_bytes(c: dict[str, Any]) -> int:
    """The model's bf16 weight bytes (what the safetensors file holds, less its header)."""
    return sum(2 * math.prod(shape) for _, shape, _ in shapes(c))


_FAST_CHUNK = 64 << 20  # bytes generated and written per job: large writes, bounded memory
_BF16_ONE = 0x3F80


def _random_bf16(seed: int, n: int) -> Any:
    """`n` random bf16 values as uint16 bits, vectorised: sign and 7 mantissa bits at random,
    the exponent one of four octaves, so every |x| is in [1/32, 1/2) and the standard deviation
    is about 0.22 (close to the other sizes' 0.25): no zeros, no overflow in a deep stack."""
    import numpy as np

    u = np.random.PCG64(np.random.SeedSequence([SEED, seed])).random_raw((n + 3) // 4).view(np.uint16)[:n]
    e = u >> 7
    e &= 3
    e += 122  # biased exponent of 2**-5
    e <<= 7
    u &= 0x807F
    u |= e
    return u


def _write_fast(path: Path, c: dict[str, Any], threads: int | None = None) -> None:
    """Write the weights as a safetensors file, generating and writing 64 MiB pieces on every
    core (numpy's generators and os.pwrite release the GIL). Seeded per piece: the same bytes
    whatever the thread count."""
    import numpy as np

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    jobs: list[tuple[int, int, int]] = []  # (offset in the data region, bytes, seed)
    ones: list[tuple[int, int]] = []
    off = 0
    for name, shape, rand in shapes(c):
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        if rand:
            jobs += [(off + a, min(_FAST_CHUNK, n - a), len(jobs) + 1) for a in range(0, n, _FAST_CHUNK)]
        else:
            ones.append((off, n))
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes
    base = 8 + len(raw)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, base + off)
        os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
        for a, n in ones:
            os.pwrite(fd, np.full(n // 2, _BF16_ONE, dtype=np.uint16).tobytes(), base + a)

        def one(job: tuple[int, int, int]) -> None:
            a, n, seed = job
            view = memoryview(_random_bf16(seed, n // 2)).cast("B")
            while view:  # pwrite may write less than asked
                done = os.pwrite(fd, view, base + a)
                view, a = view[done:], a + done

        with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 4) as pool:
            list(pool.map(one, jobs))
    finally:
        os.close(fd)


def make_tiny(out: Path | None = None, force: bool = False, size: str = TINY_NAME) -> Path:
    """Write the tiny model (or a larger `size` of it) to `out` (default: the per-user cache);
    a no-op when it is there. Written to a temporary sibling and renamed, so a half-made model
    is never seen."""
    from safetensors.torch import save_file

    cfg = config(size)
    out = (out or default_dir(size)).expanduser().resolve()
    if (out / "model.safetensors").is_file() and (out / ".complete").is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n"
        )
        (tmp / "tokenizer.json").write_text(_tokenizer_json())
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "model_max_length": CONFIG["max_position_embeddings"],
                    "add_bos_token": True,
                    "clean_up_tokenization_spaces": False,
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
        if size in FAST_SIZES:
            _write_fast(tmp / "model.safetensors", cfg)
        else:
            save_file(_weights(cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / ".complete").write_text(f"fastvllm {size} model v{TINY_VERSION}\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_model(model: str) -> str:
    """'tiny' means the built-in model (made on first use); anything else is a path."""
    if model == TINY_NAME:
        return str(make_tiny())
    if model in SIZES:
        return str(make_tiny(size=model))
    return model
