#!/usr/bin/env bash
# The Colab notebook's steps on a Cloud TPU VM: download + convert Llama-2-7b-hf (or the non-gated
# TinyLlama fallback), plan, QLoRA-fine-tune on Alpaca for a bounded time, evaluate before/after,
# export to Hugging Face. Run from a checkout (the install step installs requirements.txt with pip):
#   HF_TOKEN=hf_... bash scripts/tpu_vm_quickstart.sh
# Settings (environment): LLAMA_JAX_MODEL, LLAMA_JAX_TRAIN_MINUTES, LLAMA_JAX_TOPOLOGY, LLAMA_JAX_PUSH_TO,
# LLAMA_JAX_WORKDIR (default ./llama_jax_work); LLAMA_JAX_SMOKE=1 runs it on a CPU with tiny stand-ins.
# GENERATED from notebooks/colab_tpu.ipynb by scripts/make_tpu_vm_quickstart.py: edit the notebook.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" - <<'LLAMA_JAX_NOTEBOOK'

# ---- 0. Settings ----
import codecs, json, os, random, select, signal, subprocess, sys, time

SMOKE = os.environ.get("LLAMA_JAX_SMOKE") == "1"  # 1: tiny local stand-ins on a CPU (the test suite's run)
REPO_URL = "https://github.com/OWNER/llama_jax"  # placeholder: this repository's URL
MODEL = os.environ.get("LLAMA_JAX_MODEL", "meta-llama/Llama-2-7b-hf")
FALLBACK = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"  # not gated; used when the token cannot read MODEL
PUSH_TO = os.environ.get("LLAMA_JAX_PUSH_TO", "")  # e.g. "you/llama2-7b-alpaca-qlora": push only when set
TRAIN_MINUTES = float(os.environ.get("LLAMA_JAX_TRAIN_MINUTES", "20"))  # the fine-tuning's time bound
TOPOLOGY = os.environ.get("LLAMA_JAX_TOPOLOGY", "v5e-1")  # what the planner compiles for
WORK = os.path.abspath(os.environ.get("LLAMA_JAX_WORKDIR", "llama_jax_work"))  # every file this notebook writes
here = os.path.abspath(".")
REPO = os.environ.get("LLAMA_JAX_REPO") or next(
    (d for d in (here, os.path.dirname(here)) if os.path.isfile(os.path.join(d, "llama_jax", "__init__.py"))),
    os.path.join(here, "llama_jax"))  # a checkout (smoke mode, TPU VM), else where the install cell clones it
RECIPE = f"{REPO}/configs/alpaca-qlora-7b.yaml"  # the QLoRA paper's recipe, sized for a v5e-1

# What differs between the runs: sizes, sources, the base's precision, the attention kernel, the learning rate.
ALPACA = dict(train=5000, heldout=200, batch=16, grad_accum=4, max_len=512, lr=2e-4, log_every=10,
              attention="splash", tasks="arc_easy", limit=200, eval_batch=8, new_tokens=128)
RUNS = {
    "meta-llama/Llama-2-7b-hf": dict(ALPACA, preset="llama2-7b", base_dtype="nf4"),  # QLoRA: bf16 7B is 12.6 GiB
    FALLBACK: dict(ALPACA, preset="tinyllama-1.1b", base_dtype="bfloat16"),  # LoRA: 1.1B fits in bf16
    "smoke": dict(preset="tiny-gqa", base_dtype="nf4", train=512, heldout=32, batch=16, grad_accum=1, max_len=80,
                  lr=5e-3, log_every=1, attention="xla", tasks="lj_mc", limit=12, eval_batch=8, new_tokens=8),
}  # smoke: a higher learning rate, so that its 32 steps show in the loss and the perplexity
QUESTIONS = {  # (instruction, input) pairs answered before and after fine-tuning
    "smoke": [("Reverse the digits.", "47"), ("Add the two numbers.", "6+5")],
    "real": [("Give three tips for staying healthy.", ""), ("What is the capital of France?", ""),
             ("Rewrite the sentence in the passive voice.", "The cat chased the mouse.")],
}
if SMOKE:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # children skip JAX's TPU probe (libtpu is installed)
os.makedirs(WORK, exist_ok=True)


def sh(*args, ok=(0,), time_limit=None):
    """Run a command, show its output as it comes (progress bars included) and return it.

    Raises when the exit status is not in `ok`. After `time_limit` seconds the command gets SIGTERM
    once: `python -m train` then saves a checkpoint and exits (running it again resumes)."""
    args = [str(a) for a in args]
    print("$", " ".join(args), flush=True)
    proc = subprocess.Popen(args, cwd=REPO if os.path.isdir(REPO) else WORK, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    decoder, out = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
    deadline = None if time_limit is None else time.time() + time_limit
    while True:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            out.append(decoder.decode(chunk))
            sys.stdout.write(out[-1])
            sys.stdout.flush()
        if deadline is not None and time.time() > deadline:
            print(f"\n[{time_limit / 60:.1f} min are up: SIGTERM, the trainer saves and stops]", flush=True)
            proc.send_signal(signal.SIGTERM)
            deadline = None
    status = proc.wait()
    if status not in ok:
        raise RuntimeError(f"{' '.join(args[:4])} ... failed with exit status {status} (its output is above)")
    return "".join(out)


def lj(module, *args, **kw):
    """`python -m module args...` with this notebook's Python (llama_jax's command lines)."""
    return sh(sys.executable, "-m", module, *args, **kw)


print(f"smoke mode: {SMOKE}; model: {'tiny random (local)' if SMOKE else MODEL}; files in {WORK}")

# ---- 1. Check the runtime ----
PROBE = ("import json, jax; d = jax.devices(); s = d[0].memory_stats() or {}; print(json.dumps(dict("
         "jax=jax.__version__, platform=d[0].platform, kind=d[0].device_kind, chips=len(d), "
         "hbm_gib=round(s.get('bytes_limit', 0) / 2**30, 2))))")


def check_runtime():
    try:
        found = json.loads(sh(sys.executable, "-c", PROBE).strip().splitlines()[-1])
    except RuntimeError:
        print("JAX is not installed yet: the install cell installs it and checks again")
        return None
    print(f"JAX {found['jax']}: {found['chips']} x {found['kind']} ({found['platform']}), "
          f"{found['hbm_gib']} GiB HBM each")
    if found["platform"] != "tpu":
        message = (f"this runtime has no TPU (JAX sees {found['chips']} {found['platform']} device(s)). In Colab: "
                   "Runtime > Change runtime type > TPU v5e-1 (or v6e-1), then Runtime > Run all.")
        if not SMOKE:
            raise RuntimeError(message)
        print("smoke mode:", message)
    elif not found["kind"].startswith("TPU v5 lite") or found["chips"] != 1:
        print(f"the sizes in this notebook are for a v5e-1; set LLAMA_JAX_TOPOLOGY for this one (e.g. v6e-1) "
              "so that the planner checks them")
    return found


RUNTIME = check_runtime()

# ---- 2. Install llama_jax ----
if SMOKE:
    print(f"smoke mode: using the checkout at {REPO}; nothing installed")
else:
    if not os.path.isdir(REPO):
        sh("git", "clone", "--depth", "1", REPO_URL, REPO)
    # The CPU build of PyTorch first: requirements.txt pins its version, and the default wheel would
    # pull several GB of CUDA libraries that a TPU runtime cannot use.
    sh(sys.executable, "-m", "pip", "install", "-q", "torch==2.13.0", "--index-url",
       "https://download.pytorch.org/whl/cpu")
    sh(sys.executable, "-m", "pip", "install", "-q", "-r", f"{REPO}/requirements.txt", "-e", REPO)
    if RUNTIME is None:
        RUNTIME = check_runtime()

# ---- 3. Log in to the Hugging Face Hub ----
if SMOKE:
    print("smoke mode: no Hub access needed")
else:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    token = huggingface_hub.get_token()  # HF_TOKEN, the Colab secret HF_TOKEN, or an earlier `hf auth login`
    if token is None:
        print("no Hugging Face token: add the Colab secret HF_TOKEN (or set HF_TOKEN) for gated models")
    try:
        huggingface_hub.auth_check(MODEL, token=token)
        print(f"the token can read {MODEL}")
    except HfHubHTTPError as e:
        if MODEL == FALLBACK:
            raise
        reason = str(e).splitlines()[0]
        print(f"cannot read {MODEL} ({type(e).__name__}: {reason}).\nUsing {FALLBACK} instead "
              "(not gated; Llama-2 architecture and tokenizer).")
        MODEL = FALLBACK

# ---- 4. Download and convert ----
RUN = RUNS["smoke" if SMOKE else MODEL]
BASE = f"{WORK}/ckpt/base"
if SMOKE:
    SOURCE, TOKENIZER = f"{WORK}/hf-tiny-random", f"{REPO}/data/tokenizer.model"
    if not os.path.isfile(f"{SOURCE}/config.json"):
        import torch
        import transformers

        torch.manual_seed(0)
        # The shapes of llama_jax's tiny-gqa preset (what the planner plans). Weights of std 0.2, not 0.02:
        # a 64-wide model that small gives near-uniform logits and a loss that LoRA can hardly move.
        tiny = transformers.LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2)
        transformers.LlamaForCausalLM(tiny).to(torch.float32).save_pretrained(SOURCE)  # safetensors
else:
    SOURCE = TOKENIZER = MODEL  # a Hub repo id: downloaded by the converter
if os.path.isfile(f"{BASE}/config.json"):
    print(f"{BASE} is already converted")
else:
    lj("llama_jax.convert", "hf", SOURCE, BASE, "--dtype", "bfloat16", "--tokenizer", TOKENIZER)

# ---- 5. Ask the base model ----
ANSWER = r"""
import json, sys
import llama_jax as lj
gen = lj.Generator(sys.argv[1], dtype="bfloat16")
for instruction, input in json.loads(sys.argv[2]):
    answer = gen.alpaca(instruction, input, max_new_tokens=int(sys.argv[3]), temperature=0)
    print(f"\n### {instruction} {input}\n{answer}", flush=True)
"""


def answer(checkpoint):
    questions = QUESTIONS["smoke" if SMOKE else "real"]
    return sh(sys.executable, "-c", ANSWER, checkpoint, json.dumps(questions), RUN["new_tokens"])


answer(BASE);

# ---- 6. Will it fit? Plan the memory ----
import yaml

LORA = yaml.safe_load(open(RECIPE))["lora"]
plan = lj("train.plan", "--model", RUN["preset"], "--topology", TOPOLOGY, "--batch", RUN["batch"],
          "--seq", RUN["max_len"], "--grad-accum", RUN["grad_accum"], "--lora-rank", LORA["rank"],
          "--base-dtype", RUN["base_dtype"], "--attention", RUN["attention"], ok=(0, 1))
if "verdict: FITS" not in plan:
    print("\nDOES NOT FIT: lower RUN['batch'] or raise RUN['grad_accum'] (smaller microbatches), or use "
          "base_dtype nf4, and plan again before training")

# ---- 7. Data: a subset of Stanford Alpaca ----
if SMOKE:
    records = json.load(open(f"{REPO}/data/demo_alpaca_train.json"))
else:
    import datasets

    records = datasets.load_dataset("tatsu-lab/alpaca", split="train").to_list()
records = [{k: r[k] for k in ("instruction", "input", "output")} for r in records]
random.Random(0).shuffle(records)
heldout, train = records[:RUN["heldout"]], records[RUN["heldout"]:RUN["heldout"] + RUN["train"]]
os.makedirs(f"{WORK}/data", exist_ok=True)
TRAIN, HELDOUT = f"{WORK}/data/alpaca_train.json", f"{WORK}/data/heldout_answers.jsonl"
with open(TRAIN, "w") as f:
    json.dump(train, f)
with open(HELDOUT, "w") as f:
    f.writelines(json.dumps({"text": r["output"]}) + "\n" for r in heldout)
print(f"{len(train)} training records -> {TRAIN}\n{len(heldout)} held-out answers -> {HELDOUT}")

# ---- 8. Evaluate the base model ----
def evaluate(checkpoint, name):
    """{"ppl": .., "acc": .., "acc_norm": ..} of a checkpoint (perplexity + harness task)."""
    common = ["--checkpoint", checkpoint, "--dtype", "bfloat16", "--batch-size", RUN["eval_batch"]]
    out = lj("llama_jax.eval", "perplexity", *common, "--data", HELDOUT)
    ppl = json.loads([line for line in out.splitlines() if line.startswith('{"ppl"')][-1])["ppl"]
    local = ["--include-path", f"{REPO}/tests/eval_tasks"] if SMOKE else []
    saved = f"{WORK}/eval/{name}.json"
    os.makedirs(os.path.dirname(saved), exist_ok=True)
    lj("llama_jax.eval", "harness", *common, *local, "--tasks", RUN["tasks"], "--num-fewshot", 0,
       "--limit", RUN["limit"], "--output", saved)
    task = json.load(open(saved))["results"][RUN["tasks"]]
    return {"ppl": ppl, "acc": task["acc,none"], "acc_norm": task["acc_norm,none"]}


SCORES = {"before": evaluate(BASE, "before")}
print(SCORES)

# ---- 9. QLoRA fine-tuning, for a bounded time ----
RUN_DIR = f"{WORK}/runs/alpaca-qlora"
lj("train", "--config", RECIPE, f"init_from={BASE}", f"tokenizer={BASE}/tokenizer.model", f"output_dir={RUN_DIR}",
   f"data.train=[{TRAIN}]", "steps=0", "epochs=1", f"batch_size={RUN['batch']}", f"grad_accum={RUN['grad_accum']}",
   f"data.max_len={RUN['max_len']}", f"optim.lr={RUN['lr']}", f"lora.base_dtype={RUN['base_dtype']}",
   f"model.attention={RUN['attention']}", f"log_every={RUN['log_every']}", "checkpoint_every=50",
   time_limit=60 * TRAIN_MINUTES);

# ---- 10. The loss curve ----
import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # a script: save the figure only
import matplotlib.pyplot as plt

logged = [json.loads(line) for line in open(f"{RUN_DIR}/metrics.jsonl")]
steps, losses = zip(*[(m["step"], m["loss"]) for m in logged if "loss" in m])
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
ax.set(xlabel="step", ylabel="training loss (nats per answer token)",
       title=f"QLoRA on {len(train)} Alpaca records" + (" (smoke)" if SMOKE else ""))
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(f"{WORK}/loss.png", dpi=100)
print(f"loss {losses[0]:.3f} at step {steps[0]} -> {losses[-1]:.3f} at step {steps[-1]}; saved {WORK}/loss.png")
if "ipykernel" in sys.modules:
    plt.show()

# ---- 11. Export to Hugging Face ----
ADAPTER, MERGED_HF = f"{WORK}/export/adapter", f"{WORK}/export/merged"
lj("llama_jax.convert", "export-peft", RUN_DIR, ADAPTER, "--overwrite")
lj("llama_jax.convert", "export-hf", RUN_DIR, MERGED_HF, "--dtype", "bfloat16", "--overwrite")
print(sorted(os.listdir(ADAPTER)), sorted(os.listdir(MERGED_HF)))

# ---- 12. Evaluate the fine-tuned model ----
MERGED = f"{WORK}/ckpt/merged"
lj("llama_jax.convert", "hf", MERGED_HF, MERGED, "--overwrite")
SCORES["after"] = evaluate(MERGED, "after")
print(f"{'':8}{'perplexity':>12}{'acc':>8}{'acc_norm':>10}   ({RUN['tasks']}, {RUN['limit']} questions)")
for name, s in SCORES.items():
    print(f"{name:8}{s['ppl']:12.3f}{s['acc']:8.3f}{s['acc_norm']:10.3f}")

# ---- 13. Ask the fine-tuned model ----
answer(MERGED);

# ---- 14. Push to the Hub (optional) ----
if not PUSH_TO:
    print("not pushing (set LLAMA_JAX_PUSH_TO=you/name to push the adapter and the merged model)")
else:
    from huggingface_hub import HfApi

    api = HfApi()
    for folder, repo_id in ((ADAPTER, PUSH_TO), (MERGED_HF, f"{PUSH_TO}-merged")):
        api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="llama_jax notebooks/colab_tpu.ipynb")
        print(f"pushed {folder} to {repo_id}")
LLAMA_JAX_NOTEBOOK
