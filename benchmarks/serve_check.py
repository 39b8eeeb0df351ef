"""Serve an SDAR-format export on the engines and check them against the project's decoder.

One job: export a small Qwen3-shaped student (the real 151,936-row vocabulary, so that the engines'
[MASK] id 151669 exists) with ``--format sdar``, decode one fixed prompt set greedily at threshold
1.0 (static: one token per round) and 0.9 with

- the project's sampler (``rollout.sampler.BlockSampler``, absolute block grid, the reference);
- SGLang (``python -m sglang.launch_server ... --dllm-algorithm LowConfidence``, block size and
  threshold in the algorithm YAML; requests over HTTP), where the package and a GPU are present;
- lmdeploy's ``pipeline`` (PyTorch engine, ``dllm_*`` settings), likewise;

and report, for each engine and threshold, the per-token agreement with the project's tokens and
the tokens/s, in one JSON file (``--out``). Where an engine or a GPU is missing (or with
``--dry-run``, for CI), the export and the project's side still run, and the exact commands the
check would run are printed and recorded.

The student is not trained: random weights (seeded) with the [MASK] embedding row zeroed (as in
Qwen3, where no token maps to it) and the final norm scaled so that threshold 0.9 unmasks about
``--tokens-per-round`` tokens per round (random weights are otherwise too unsure for any threshold
to fire). Agreement needs no trained weights: every decoder sees the same logits; what differs is
each engine's kernels, batching and rules. Two rule differences are known from the engines' source
(``docs/serving.md``): lmdeploy's dynamic rule keeps positions *at or above* the threshold (ours:
strictly above), and SGLang and lmdeploy may choose [MASK] itself as a token (ours never does).
Prompts cover every ``P mod block_size`` (the heads of the absolute grid).

    python benchmarks/serve_check.py --out benchmarks/results/serve_check_<gpu>.json    # a GPU machine
    python benchmarks/serve_check.py --dry-run --out /tmp/serve_check.json             # CI / CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|full scope is deprecated).*")

from nemo_opdlm.convert import hf_config as hfc  # noqa: E402
from nemo_opdlm.convert.hf_to_mcore import load_hf_weights, without_random_init  # noqa: E402
from nemo_opdlm.convert.mcore_to_hf import export_chunks  # noqa: E402
from nemo_opdlm.convert.sdar import SDAR_MASK_TOKEN_ID, ServeSettings, serve_commands  # noqa: E402
from nemo_opdlm.models.config import DiffusionConfig  # noqa: E402
from nemo_opdlm.models.student import build_student, unwrap  # noqa: E402
from nemo_opdlm.rollout.decode import DecodeConfig  # noqa: E402
from nemo_opdlm.rollout.sampler import BlockSampler, SamplerConfig  # noqa: E402
from nemo_opdlm.runtime.distributed import ParallelLayout, runtime  # noqa: E402

VOCAB = 151936
TOKENIZER_SIZE = 151669
"""Qwen3's tokenizer size: the [MASK] becomes the next id, 151669, as in SDAR's tokenizers."""
THRESHOLDS = {"static": 1.0, "t0.9": 0.9}
"""The two decodings compared: SGLang's threshold 1.0 never fires, leaving one token per round."""


@dataclass(frozen=True)
class Settings:
    """The student's shape and the decoding compared."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    ffn: int = 768
    block_size: int = 4
    prompts: int = 16
    min_prompt: int = 9
    max_new_tokens: int = 64
    tokens_per_round: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompts < self.block_size:
            raise ValueError(f"--prompts {self.prompts} must be >= --block-size {self.block_size}: the prompt lengths "
                             "must cover every P mod block_size")


# --- the student ------------------------------------------------------------------------------


def save_tokenizer(directory: str, size: int = TOKENIZER_SIZE) -> None:
    """A word-level tokenizer of Qwen3's size (``w0`` ... ``w151668``; EOS ``w2``) or ``size`` words:
    text decodes and re-encodes to the same ids, so an engine fed text sees exactly the prompt's ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def special(word: str) -> AddedToken:
        return AddedToken(word, single_word=True, special=True, normalized=False)

    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=special("w0"), eos_token=special("w2"),
                            bos_token=special("w1")).save_pretrained(directory)


def save_random_qwen3(directory: str, s: Settings) -> None:
    """A seeded random Qwen3 of the settings' shape (tied embeddings, as Qwen3 <= 4B) and its tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(s.seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                         max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1_000_000.0,
                         bos_token_id=1, eos_token_id=2)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[SDAR_MASK_TOKEN_ID:].zero_()  # rows no token maps to
    model.save_pretrained(directory)
    save_tokenizer(directory)


def prompt_set(s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts ``[N, P]`` (ids of ordinary words) and lengths ``[N]``: consecutive
    lengths from ``min_prompt``, so that every ``P mod block_size`` occurs."""
    g = torch.Generator().manual_seed(1000 + s.seed)
    lens = torch.arange(s.min_prompt, s.min_prompt + s.prompts)
    width = int(lens.max())
    ids = torch.randint(3, 50_000, (s.prompts, width), generator=g)
    real = torch.arange(width)[None, :] >= (width - lens)[:, None]
    return ids * real, lens


def decode_config(s: Settings, name: str, tokens: int) -> SamplerConfig:
    """Greedy, block ``s.block_size``, absolute grid; ``name`` a key of ``THRESHOLDS``; no EOS (the
    engines are told to ignore it), so every row decodes ``tokens`` tokens."""
    mode = dict(mode="static") if name == "static" else dict(mode="dynamic", threshold=THRESHOLDS[name])
    return SamplerConfig(decode=DecodeConfig(steps_per_block=s.block_size, temperature=0.0, **mode),
                         diffusion=DiffusionConfig(block_size=s.block_size, mask_token_id=SDAR_MASK_TOKEN_ID,
                                                   block_grid="absolute"),
                         max_new_tokens=tokens)


@torch.no_grad()
def calibrate(chunks, s: Settings, prompts: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Scale the final norm so that threshold 0.9 gives about ``s.tokens_per_round`` tokens per
    round (bisection on the log scale, short rollouts of the first prompts)."""
    from benchmarks.gpu_bench import bisect_norm_scale

    ids, lens = prompts[0][:8], prompts[1][:8]
    settings = decode_config(s, "t0.9", 4 * s.block_size)
    return bisect_norm_scale(unwrap(chunks[-1]).decoder.final_layernorm,
                             lambda: BlockSampler(chunks, settings).generate(ids, lens).metrics.tokens_per_round,
                             s.tokens_per_round, steps=7)


def build_and_export(work: str, s: Settings, parallel) -> tuple[list, dict[str, Any], str]:
    """The random student (megatron chunks, calibrated), exported in the SDAR format; returns
    (chunks, a description of the student, the export directory)."""
    source, export = os.path.join(work, "qwen3_random"), os.path.join(work, "student_sdar")
    save_random_qwen3(source, s)
    cfg = hfc.model_config_from_hf(hfc.read_hf_config(source))
    diffusion = DiffusionConfig(block_size=s.block_size, mask_token_id=SDAR_MASK_TOKEN_ID, block_grid="absolute")
    chunks = build_student(without_random_init(cfg), diffusion, parallel)
    load_hf_weights(chunks, source, cfg)
    for c in chunks:
        c.eval()
    calibration = calibrate(chunks, s, prompt_set(s))
    if os.path.exists(export):
        shutil.rmtree(export)
    export_chunks(chunks, cfg, export, source_config=hfc.read_hf_config(source), diffusion=diffusion,
                  assets_dir=source, export_format="sdar",
                  decoding=DecodeConfig(mode="dynamic", threshold=THRESHOLDS["t0.9"]), max_new_tokens=s.max_new_tokens)
    student = {"weights": "random init (seeded), [MASK] row zeroed, final norm scaled; untrained",
               "shape": {k: getattr(s, k) for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "ffn")},
               "vocab_size": VOCAB, "mask_token_id": SDAR_MASK_TOKEN_ID, "block_size": s.block_size,
               "block_grid": "absolute", **calibration}
    return chunks, student, export


def project_side(chunks, s: Settings, prompts) -> dict[str, Any]:
    """The reference decodings: tokens and speed of the project's sampler at each threshold."""
    ids, lens = prompts
    out = {}
    for name in THRESHOLDS:
        sampler = BlockSampler(chunks, decode_config(s, name, s.max_new_tokens))
        sampler.generate(ids[:2], lens[:2])  # warm-up
        start = time.perf_counter()
        rollout = sampler.generate(ids, lens)
        seconds = time.perf_counter() - start
        tokens = rollout.tokens[:, :s.max_new_tokens]
        generated = int(rollout.valid[:, :s.max_new_tokens].sum())
        out[name] = {"threshold": THRESHOLDS[name], "tokens": tokens.tolist(), "tokens_generated": generated,
                     "wall_s": round(seconds, 4), "tokens_per_s": round(generated / seconds, 2),
                     "tokens_per_round": round(rollout.metrics.tokens_per_round, 3), "rounds": rollout.metrics.rounds}
    return out


# --- the engines ------------------------------------------------------------------------------


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, Any]:
    """Per-token agreement of an engine's tokens with ours, position by position over our tokens (a
    missing engine token counts as a disagreement); with each row's first divergence."""
    matched = compared = identical = 0
    first: list[Optional[int]] = []
    for a, b in zip(ours, theirs):
        same = [i < len(b) and a[i] == b[i] for i in range(len(a))]
        matched += sum(same)
        compared += len(a)
        identical += all(same)
        first.append(None if all(same) else same.index(False))
    return {"per_token": round(matched / max(compared, 1), 4), "tokens_compared": compared,
            "rows_identical": identical, "rows": len(ours), "first_divergence": first}


def engine_available(package: str) -> tuple[bool, str]:
    """(can it run here, why not): the package importable and a CUDA device present."""
    if importlib.util.find_spec(package) is None:
        return False, f"{package} is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def sglang_command(export: str, yaml_path: str, port: int, max_running: int) -> list[str]:
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", export, "--trust-remote-code",
            "--dllm-algorithm", "LowConfidence", "--dllm-algorithm-config", yaml_path, "--host", "127.0.0.1",
            "--port", str(port), "--max-running-requests", str(max_running)]


def sglang_yaml(block_size: int, threshold: float) -> str:
    return f"block_size: {block_size}\nthreshold: {threshold}\n"


def sglang_request(ids: list[int], new: int) -> dict[str, Any]:
    """SGLang's native /generate body: token ids in and out (its OpenAI-compatible /v1/completions
    returns text only); greedy, EOS ignored."""
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": new, "temperature": 0.0, "ignore_eos": True}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def run_sglang(export: str, work: str, s: Settings, prompts: list[list[int]], name: str,
               timeout_s: float) -> dict[str, Any]:
    """Launch SGLang on the export with ``THRESHOLDS[name]``, send every prompt at once, stop it."""
    yaml_path = os.path.join(work, f"sglang_{name}.yaml")
    with open(yaml_path, "w") as f:
        f.write(sglang_yaml(s.block_size, THRESHOLDS[name]))
    port = _free_port()
    log = open(os.path.join(work, f"sglang_{name}.log"), "w")
    proc = subprocess.Popen(sglang_command(export, yaml_path, port, len(prompts)), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"sglang exited with {proc.returncode} before serving (log: {log.name})")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.time() > deadline:
                raise TimeoutError(f"sglang did not serve within {timeout_s:.0f} s (log: {log.name})")
            time.sleep(2)
        _post(base + "/generate", sglang_request(prompts[0], s.block_size), timeout_s)  # warm-up
        results: list[Any] = [None] * len(prompts)

        def one(i: int) -> None:
            results[i] = _post(base + "/generate", sglang_request(prompts[i], s.max_new_tokens), timeout_s)

        start = time.perf_counter()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    tokens = [list(r.get("output_ids") or []) for r in results]
    generated = sum(len(t) for t in tokens)
    return {"tokens": tokens, "wall_s": round(seconds, 4), "tokens_per_s": round(generated / seconds, 2),
            "concurrent_requests": len(prompts)}


LMDEPLOY_SCRIPT = r'''
import json, sys, time
from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
export, block, strategy, threshold, new, prompts_path, out_path = sys.argv[1:8]
texts = json.load(open(prompts_path))
pipe = pipeline(export, backend_config=PytorchEngineConfig(
    dllm_block_length=int(block), dllm_denoising_steps=int(block), dllm_unmasking_strategy=strategy,
    dllm_confidence_threshold=float(threshold)))
gen = GenerationConfig(max_new_tokens=int(new), do_sample=False, ignore_eos=True)
pipe(texts[:1], gen_config=GenerationConfig(max_new_tokens=int(block), do_sample=False))  # warm-up
start = time.perf_counter()
responses = pipe(texts, gen_config=gen)
seconds = time.perf_counter() - start
json.dump({"tokens": [list(r.token_ids) for r in responses], "input_lens": [r.input_token_len for r in responses],
           "wall_s": seconds}, open(out_path, "w"))
'''


def lmdeploy_args(s: Settings, name: str) -> dict[str, Any]:
    strategy = "low_confidence_static" if name == "static" else "low_confidence_dynamic"
    return dict(dllm_block_length=s.block_size, dllm_denoising_steps=s.block_size, dllm_unmasking_strategy=strategy,
                dllm_confidence_threshold=THRESHOLDS[name])


def run_lmdeploy(export: str, work: str, s: Settings, texts: list[str], prompt_lens: list[int], name: str,
                 timeout_s: float) -> dict[str, Any]:
    """lmdeploy's pipeline in a child process (its engine holds the GPU until the process ends)."""
    prompts_path, out_path = os.path.join(work, "lmdeploy_prompts.json"), os.path.join(work, f"lmdeploy_{name}.json")
    with open(prompts_path, "w") as f:
        json.dump(texts, f)
    a = lmdeploy_args(s, name)
    proc = subprocess.run([sys.executable, "-c", LMDEPLOY_SCRIPT, export, str(s.block_size),
                           a["dllm_unmasking_strategy"], str(THRESHOLDS[name]), str(s.max_new_tokens), prompts_path,
                           out_path],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"lmdeploy exited with {proc.returncode}: {proc.stderr[-2000:]}")
    data = json.load(open(out_path))
    generated = sum(len(t) for t in data["tokens"])
    return {"tokens": data["tokens"], "wall_s": round(data["wall_s"], 4),
            "tokens_per_s": round(generated / data["wall_s"], 2),
            "prompt_ids_as_given": data["input_lens"] == prompt_lens}


def commands(export: str, s: Settings) -> dict[str, Any]:
    """What the check runs (and what a user runs): per engine and threshold."""
    out: dict[str, Any] = {"sglang": {}, "lmdeploy": {}}
    for name, threshold in THRESHOLDS.items():
        yaml_path = f"sglang_{name}.yaml"
        launch = " ".join(sglang_command(export, yaml_path, 30000, s.prompts)[1:])
        out["sglang"][name] = {"yaml": sglang_yaml(s.block_size, threshold), "launch": f"python {launch}",
                               "request": "POST http://127.0.0.1:30000/generate "
                                          + json.dumps(sglang_request([101, 102], s.max_new_tokens))}
        args = ", ".join(f"{k}={v!r}" for k, v in lmdeploy_args(s, name).items())
        out["lmdeploy"][name] = (f"pipeline({export!r}, backend_config=PytorchEngineConfig({args}))(texts, "
                                 f"gen_config=GenerationConfig(max_new_tokens={s.max_new_tokens}, do_sample=False, "
                                 "ignore_eos=True))")
    out["jetengine"] = {"note": "not run by this check (no HTTP server; JetEngine needs flash-attn)",
                        **{name: serve_commands(export, ServeSettings(
                            block_size=s.block_size, steps_per_block=s.block_size,
                            threshold=None if name == "static" else THRESHOLDS[name]))["jetengine"]
                           for name in THRESHOLDS}}
    return out


# --- the run ------------------------------------------------------------------------------------


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"


def write(path: str, report: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON report (default: benchmarks/results/serve_check_<device>.json)")
    p.add_argument("--work", default=None, help="working directory for the export and logs (default: a temporary one)")
    p.add_argument("--dry-run", action="store_true", help="export and decode with the project only; print the commands")
    p.add_argument("--engines", default="sglang,lmdeploy", help="comma-separated subset of sglang,lmdeploy")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds an engine may take to start and decode")
    for f in Settings.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    s = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__})
    engines = [e for e in args.engines.split(",") if e]
    unknown = sorted(set(engines) - {"sglang", "lmdeploy"})
    if unknown:
        print(f"serve_check: error: --engines {unknown} unknown; choose from sglang, lmdeploy", file=sys.stderr)
        return 2
    device = device_name()
    out = args.out or os.path.join(ROOT, "benchmarks", "results",
                                   f"serve_check_{device.split(' (')[0].lower().replace(' ', '_')}.json")
    work = args.work or tempfile.mkdtemp(prefix="serve_check_")
    os.makedirs(work, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "serve_check", "device": device, "settings": asdict(s),
                              "dry_run": args.dry_run, "engines": {}}
    with runtime(ParallelLayout()) as rt:
        chunks, report["student"], export = build_and_export(work, s, rt.ctx)
        prompts = prompt_set(s)
        report["export"] = export
        report["prompt_lens"] = prompts[1].tolist()
        report["project"] = project_side(chunks, s, prompts)
    report["commands"] = commands(export, s)
    print(f"serve_check: {report['student']['weights']}; exported to {export} (SDAR format, absolute grid)")
    for name, r in report["project"].items():
        print(f"  project sampler {name:6s}: {r['tokens_per_s']:9.1f} tok/s, {r['tokens_per_round']:.2f} tokens/round "
              f"({device})")
    ids, lens = prompts
    prompt_ids = [row[len(row) - int(n):] for row, n in zip(ids.tolist(), lens)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    texts = [tok.decode(p) for p in prompt_ids]
    for engine in engines:
        ok, why = (False, "--dry-run") if args.dry_run else engine_available(engine)
        entry: dict[str, Any] = {"ran": ok}
        report["engines"][engine] = entry
        if not ok:
            entry["skipped"] = why
            print(f"serve_check: {engine} not run ({why}); it would run:")
            for name, cmd in report["commands"][engine].items():
                print(f"  [{name}] " + (cmd if isinstance(cmd, str) else "\n    ".join(
                    [f"cat > sglang_{name}.yaml <<'EOF'\n{cmd['yaml']}EOF", cmd["launch"], cmd["request"]])))
            continue
        for name in THRESHOLDS:
            try:
                if engine == "sglang":
                    got = run_sglang(export, work, s, prompt_ids, name, args.timeout)
                else:
                    got = run_lmdeploy(export, work, s, texts, lens.tolist(), name, args.timeout)
            except Exception as err:  # one engine's failure must not lose the rest of the report
                entry[name] = {"error": f"{type(err).__name__}: {err}"}
                print(f"serve_check: {engine} {name} failed: {err}", file=sys.stderr)
                write(out, report)
                continue
            agree = agreement(report["project"][name]["tokens"], got.pop("tokens"))
            entry[name] = {**got, "agreement": agree}
            print(f"  {engine:8s} {name:6s}: agreement {agree['per_token']:.4f} ({agree['rows_identical']}/"
                  f"{agree['rows']} rows identical), {got['tokens_per_s']:.1f} tok/s")
            write(out, report)
    report["finished"] = True
    write(out, report)
    print(f"serve_check: report -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
