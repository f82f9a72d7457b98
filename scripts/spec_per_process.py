"""Speculation as a new user meets it: one `generate` process per prompt of
specbench-mini, plain and speculative (both drafters, auto tree size), greedy,
64 new tokens, on the reference executor; checks each speculative answer
against the plain one token for token and prints the overall speedup and tau.

    cargo build --release --example generate
    python3 scripts/spec_per_process.py cold   # a fresh state directory per process
    python3 scripts/spec_per_process.py kept   # one state directory for all of them

GENERATE=path runs another build's binary (to compare two builds in one session).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

mode = sys.argv[1]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.environ.get("GENERATE", os.path.join(root, "target/release/examples/generate"))
prompts_file = sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "../shared/eval/specbench-mini.jsonl")
prompts = [json.loads(l) for l in open(prompts_file)]
kept = tempfile.mkdtemp()
rows = []
for p in prompts:
    res = {}
    for spec in ["off", "both"]:
        d = tempfile.mkdtemp() if mode == "cold" else kept
        cmd = [binary, "--backend", "reference", "--chat", "--max-tokens", "64", "--json",
               "--prompt", p["turns"][0], "--speculate", spec, "--state-dir", d]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[spec] = json.loads(out.stdout.strip().splitlines()[-1])
        if mode == "cold":
            shutil.rmtree(d, ignore_errors=True)
    assert res["off"]["tokens"] == res["both"]["tokens"], f"prompt {p['id']}: speculation changed the answer"
    n = res["both"]["generated_tokens"]
    rows.append((p["category"], n, res["off"]["decode_tokens_per_s"], res["both"]["decode_tokens_per_s"],
                 res["both"]["mean_accepted_tokens"], res["both"]["tree_size"],
                 res["off"]["prefill_tokens_per_s"], res["both"]["prefill_tokens_per_s"]))
    print(mode, rows[-1], flush=True)
shutil.rmtree(kept, ignore_errors=True)
tokens = sum(r[1] for r in rows)
t_off = sum(r[1] / r[2] for r in rows)
t_spec = sum(r[1] / r[3] for r in rows)
taus = [r[4] for r in rows if r[4]]
print(f"{mode}: plain {tokens / t_off:.2f} tok/s, speculative {tokens / t_spec:.2f} tok/s, "
      f"speedup {t_off / t_spec:.2f}x, mean tau {sum(taus) / max(len(taus), 1):.2f} over {len(taus)} prompts; "
      f"prefill tok/s speculative / plain, median over prompts: {sorted(r[7] / r[6] for r in rows)[len(rows) // 2]:.2f}")
