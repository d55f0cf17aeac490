"""Does sampling overlap with training better from an engine thread or an engine process?

One tiny Llama (hidden 128, 4 layers, vocab 512) is trained by a `PyTorchTrainingBackend`
(batch 8 x 128, fp32 AdamW) while an `HFRolloutEngine` samples from a copy of it (8 prompts x 4
samples, 32 new tokens per call). Timed, in one process run:

    (a) sampling alone             engine calls back to back, nothing else running
    (b) training alone             backend steps back to back, nothing else running
    (c) both at once, engine on a thread of this process
    (d) both at once, engine in its own process (torch.multiprocessing, spawn)

and the overlap speed-up (a + b) / (c or d) is printed (2x is the ceiling on 2 cores; 1x is no
overlap at all), against this setting's own (a) + (b) and against the fastest (a) plus the
fastest (b) of the round, so that a setting cannot win by being slow alone. `--settings` lists
engine mode, engine intra-op threads and trainer intra-op threads (0 = torch's default).

    python benchmarks/engine_overlap.py [--train-steps 12] [--sample-calls 6] [--rounds 3]

Measured on the 2-core CPU while other jobs kept about two cores' worth of load on it (so the
figures are noisy and far from the 2x ceiling; the module docstring of
`rollouts/inference/hf_engine.py` quotes three runs), medians of 7 rounds:

    setting (mode, engine threads)   (a) alone   (b) alone   both at once   (a+b)/both
    thread, 1                          0.73 s      1.17 s       2.09 s         0.92x
    process, 1                         0.73 s      1.27 s       1.67 s         1.21x
    thread, torch default (2)          0.75 s      1.61 s       1.95 s         1.01x
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from typing import Any

import torch
from _tiny_model import build_tiny_llama, random_batches
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rollouts.inference import HFRolloutEngine, SamplingParams
from rollouts.training import PyTorchTrainingBackend
from rollouts.training.backends import create_adamw_optimizer, create_cross_entropy_loss

BATCH_SIZE, SEQ_LEN, VOCAB_SIZE = 8, 128, 512
NUM_PROMPTS, NUM_SAMPLES, PROMPT_LEN, NEW_TOKENS = 8, 4, 16, 32


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"<{i}>": i for i in range(VOCAB_SIZE)}  # ids only; decoding is not what is timed
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<0>")


def run_training(backend: PyTorchTrainingBackend, batches: list[dict[str, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for batch in batches:
        backend.forward_backward(batch)
        backend.optim_step().wait()
    return time.perf_counter() - start


def run_sampling(engine: HFRolloutEngine, calls: int) -> float:
    prompts = [[1 + (p * 7 + i) % (VOCAB_SIZE - 1) for i in range(PROMPT_LEN)] for p in range(8)]
    params = SamplingParams(max_tokens=NEW_TOKENS, seed=0)
    start = time.perf_counter()
    for _ in range(calls):
        engine.sample(prompts[:NUM_PROMPTS], NUM_SAMPLES, params).wait()
    return time.perf_counter() - start


def run_both(
    backend: PyTorchTrainingBackend,
    engine: HFRolloutEngine,
    batches: list[dict[str, torch.Tensor]],
    calls: int,
) -> float:
    start = time.perf_counter()
    sampler = threading.Thread(target=run_sampling, args=(engine, calls))
    sampler.start()  # this thread only waits on futures; the engine's own worker does the work
    run_training(backend, batches)
    sampler.join()
    return time.perf_counter() - start


Setting = tuple[
    str, int, int
]  # (engine mode, engine intra-op threads, trainer threads); 0: default


def parse_setting(text: str) -> Setting:
    mode, engine_threads, trainer_threads = text.split(":")
    return mode, int(engine_threads), int(trainer_threads)


def set_trainer_threads(backend: PyTorchTrainingBackend, threads: int) -> None:
    # torch's OpenMP thread count is per thread: set it on the backend's own worker thread.
    count = threads or DEFAULT_THREADS
    backend._worker.submit("set_num_threads", lambda: torch.set_num_threads(count)).wait()


DEFAULT_THREADS = torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--sample-calls", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats; medians kept")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["thread:1:0", "thread:0:0", "process:1:0", "process:1:1"],
        help="MODE:ENGINE_THREADS:TRAINER_THREADS, 0 = torch's default",
    )
    args = parser.parse_args()
    settings = [parse_setting(text) for text in args.settings]
    model, tokenizer, batches = (
        build_tiny_llama(VOCAB_SIZE),
        build_tokenizer(),
        random_batches(args.train_steps, BATCH_SIZE, SEQ_LEN, VOCAB_SIZE),
    )
    engines = {
        setting: HFRolloutEngine(model, tokenizer, mode=setting[0], num_threads=setting[1] or None)
        for setting in settings
    }
    timings: dict[Setting, list[tuple[float, float, float]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as directory:
        trained = build_tiny_llama(VOCAB_SIZE)
        optimizer = create_adamw_optimizer(trained, 1e-4)
        loss_fn = create_cross_entropy_loss()
        with PyTorchTrainingBackend(trained, optimizer, loss_fn, directory, "cpu") as backend:
            run_training(backend, batches[:2])  # warm-up
            for engine in engines.values():
                run_sampling(engine, 1)  # warm-up; also waits for a child process to start
            # Rounds interleave every measurement, so drift in the machine's load hits all alike.
            for _ in range(args.rounds):
                for setting, engine in engines.items():
                    set_trainer_threads(backend, setting[2])
                    train_s = run_training(backend, batches)
                    alone_s = run_sampling(engine, args.sample_calls)
                    both_s = run_both(backend, engine, batches, args.sample_calls)
                    timings[setting].append((alone_s, train_s, both_s))
    for engine in engines.values():
        engine.close()
    report(timings, args)


def report(timings: dict[Setting, list[tuple[float, float, float]]], args: Any) -> None:
    print(f"torch's default intra-op threads: {DEFAULT_THREADS}")
    print(
        f"{args.train_steps} training steps, {args.sample_calls} sampling calls; medians of "
        f"{args.rounds} interleaved rounds"
    )
    rounds_range = range(args.rounds)
    best_alone_s = [min(t[r][0] for t in timings.values()) for r in rounds_range]
    best_train_s = [min(t[r][1] for t in timings.values()) for r in rounds_range]
    for (mode, engine_threads, trainer_threads), rounds in timings.items():
        alone_s, train_s, both_s = (statistics.median(x) for x in zip(*rounds, strict=True))
        own = statistics.median((a + t) / b for a, t, b in rounds)
        vs_best = statistics.median(
            (best_alone_s[r] + best_train_s[r]) / rounds[r][2] for r in rounds_range
        )
        letter = "c" if mode == "thread" else "d"
        print(
            f"({letter}) engine {mode:7s} engine threads={engine_threads or 'default':7} "
            f"trainer threads={trainer_threads or 'default':7} | (a) sampling alone "
            f"{alone_s:5.2f} s | (b) training alone {train_s:5.2f} s | both at once "
            f"{both_s:5.2f} s | overlap speed-up {own:.2f}x "
            f"(vs fastest sampling + fastest training {vs_best:.2f}x)"
        )


if __name__ == "__main__":
    main()
