"""A user's own PyTorch server, for plain process mode: a transformers Llama with random
weights (seeded) that generates greedily each time a trigger file appears, and writes the
tokens with a digest of its parameters' bytes (on the GPU when asked: device memory must come
back bit for bit). Run: python llama_worker.py DEVICE DIR [busy]. With `busy` (GPU) it keeps
the GPU running spin kernels of seconds each, so a CUDA lock cannot be had quickly."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

device, work = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
model = LlamaForCausalLM(cfg).to(device).eval()
prompt = torch.tensor([[1, 7, 42, 99, 3]], device=device)


def answer() -> dict[str, object]:
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=16, do_sample=False)
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    dev = str(next(model.parameters()).device)
    return {"tokens": out[0].tolist(), "digest": h.hexdigest(), "device": dev}


n = 0
busy = len(sys.argv) > 3 and sys.argv[3] == "busy"
if len(sys.argv) > 3 and sys.argv[3] == "pair":
    child_code = (
        "import sys, time, torch, pathlib\n"
        "x = torch.ones(1 << 20, device=sys.argv[1])\n"
        "pathlib.Path(sys.argv[2], 'child-ready').write_text('1')\n"
        "while True: time.sleep(0.05)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", child_code, device, str(work)], stdin=subprocess.DEVNULL)
    while not (work / "child-ready").exists():
        time.sleep(0.02)
    (work / "child.pid").write_text(str(child.pid))
(work / "ready").write_text("1")
while True:
    if busy:
        torch.cuda._sleep(5_000_000_000)  # ~3 s of spinning on the GPU, queued back to back
        torch.cuda.synchronize()
        continue
    if (work / f"go-{n}").exists():
        (work / f"out-{n}.json.tmp").write_text(json.dumps(answer()))
        (work / f"out-{n}.json.tmp").rename(work / f"out-{n}.json")
        n += 1
    time.sleep(0.02)
