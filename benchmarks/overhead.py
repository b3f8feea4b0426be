"""Overhead: images/s of the recipe's training loop vs a hand-written PyTorch loop, interleaved in one run.

    .venv/bin/python benchmarks/overhead.py                  # default job, 1 process (2 threads)
    .venv/bin/python benchmarks/overhead.py --quick          # a few steps: checks that it runs
    .venv/bin/python benchmarks/overhead.py --processes 2    # 2 processes (accelerate_configs/cpu_ddp.yaml):
                                                             # recipe DDP vs hand-written DDP, 1 thread each
    .venv/bin/accelerate launch --config_file CONFIG benchmarks/overhead.py   # any other non-DeepSpeed config

The recipe arm is the real loop: ``shared.engine.train_one_epoch`` driven by an
Accelerator from ``shared.runtime.create_accelerator``, the TensorLoader from
``shared.data.build_data``, timm's optimizer and scheduler built as the recipe
builds them, plus the recipe's per-step work in ``main()`` (progress bar,
stop-signal check, NaN checks every ``--log-every`` steps). The plain arm is a
hand-written ``for`` loop on the same model, optimizer, scheduler, batch and
uint8 tensors: index, normalise, forward, loss, backward, step.

The two arms keep their own model and state and take turns step by step
(A B B A ...; ``--interleave round`` takes turns every ``--steps`` steps
instead), so the noise of a shared machine, which comes and goes over seconds,
hits both alike. A round is ``--steps`` steps of each arm; the result is the
median over ``--rounds`` rounds of recipe images/s / plain images/s. ``--profile`` adds a cProfile of one round of
each arm (where the time goes).

``--arms`` may add patched variants of the recipe that demonstrate proposed
changes to shared/ (see ``VARIANTS``); the repository's files are not changed.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)
from plain_loop import PlainLoop  # noqa: E402

import torch  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from shared import engine  # noqa: E402
from shared.config import parse_config  # noqa: E402
from shared.data import build_data  # noqa: E402
from shared.models import create_model  # noqa: E402
from shared.runtime import StopSignal, create_accelerator, fill_deepspeed_auto  # noqa: E402

# Patched variants of the recipe arm: name -> (what it changes, function that patches an arm).
VARIANTS = {}


def variant(name: str, doc: str):
    def register(fn):
        VARIANTS[name] = (doc, fn)
        return fn
    return register


@variant("recipe+lazy-stop", "StopSignal.requested() all-reduces its flag only every --log-every steps (not every step)")
def _lazy_stop(arm: "RecipeArm") -> None:
    original = arm.stop.requested

    def requested() -> bool:
        if arm.progress.global_step % arm.cfg.log_every:
            return False
        return original()

    arm.stop.requested = requested


@variant("recipe+device-data", "the uint8 data set is moved to the device once and batches are gathered there "
                                "(no per-step host-to-device copy; a no-op on CPU)")
def _device_data(arm: "RecipeArm") -> None:
    arm.loader.images = arm.loader.images.to(arm.accelerator.device)
    arm.loader.labels = arm.loader.labels.to(arm.accelerator.device)


@variant("recipe+lazy-stop+device-data", "both of the above")
def _both(arm: "RecipeArm") -> None:
    _lazy_stop(arm)
    _device_data(arm)


class RecipeArm:
    """The recipe's loop: engine.train_one_epoch plus the per-step work of the recipe's main()."""

    name = "recipe"

    def __init__(self, recipe, cfg, accelerator, data, model_hook=None):
        self.recipe, self.cfg, self.accelerator = recipe, cfg, accelerator
        # this arm's own loader and sampler (a variant may change them), over the same tensors
        self.loader = copy.copy(data.train)
        self.loader.sampler = copy.copy(data.train.sampler)
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, data.num_classes, data.in_chans, cfg.pretrained, cfg.drop_rate)
        if model_hook is not None:  # e.g. channels_last or torch.compile (benchmarks/gpu_suite.py)
            model = model_hook(model)
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        self.scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr,
            step_on_epochs=False, updates_per_epoch=len(data.train) // cfg.grad_accum_steps)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        fill_deepspeed_auto(accelerator, cfg.batch_size, cfg.clip_grad)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.progress = engine.Progress()
        self.stop = StopSignal(accelerator)
        self.bar = tqdm(total=len(data.train), disable=True)  # the recipe's bar, not drawn (keeps the log readable)
        self.epoch_iter = None
        self.stats = None

    def _new_epoch(self) -> None:
        self.loader.sampler.set_epoch(self.progress.epoch)
        self.stats = engine.EpochStats()
        self.epoch_iter = engine.train_one_epoch(
            self.model, self.loader, self.optimizer, self.scheduler, self.criterion, self.accelerator,
            self.progress, clip_grad=self.cfg.clip_grad, check_every=self.cfg.log_every, stats=self.stats)

    def run(self, steps: int) -> int:
        """Train ``steps`` optimizer steps; return the images this rank trained on."""
        cfg, progress, images = self.cfg, self.progress, 0
        for _ in range(steps):
            if self.epoch_iter is None:
                self._new_epoch()
            before = self.stats.images
            try:
                stats = next(self.epoch_iter)
            except StopIteration:  # epoch end: the recipe evaluates and checkpoints here (not timed)
                progress.epoch, progress.batch, progress.samples = progress.epoch + 1, 0, 0
                self._new_epoch()
                before = 0
                stats = next(self.epoch_iter)
            images += stats.images - before
            # --- the per-step body of the recipe's main() loop
            self.bar.n = progress.batch
            if progress.global_step % cfg.log_every == 0 and stats.batches:
                self.bar.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
                self.bar.refresh()
                self.recipe.warn_on_loss_scale(self.accelerator, self.model, cfg.loss_scale_warning, progress.global_step)
            stopping = self.stop.requested() or progress.global_step == cfg.stop_after_steps
            if stopping or (cfg.checkpoint_every_steps and progress.global_step % cfg.checkpoint_every_steps == 0):
                engine.check_finite(stats)  # (a checkpoint would be written here)
        return images


class PlainArm(PlainLoop):
    """benchmarks/plain_loop.py's hand-written loop on the recipe's uint8 tensors (DDP by hand on >1 process)."""

    name = "plain"

    def __init__(self, cfg, accelerator, data):
        loader = data.train
        super().__init__(loader.images, loader.labels, loader.mean.flatten() / 255, loader.std.flatten() / 255,
                         model=cfg.model, num_classes=data.num_classes, batch_size=cfg.batch_size, epochs=cfg.epochs,
                         lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, opt=cfg.opt, sched=cfg.sched,
                         seed=cfg.seed, rank=accelerator.process_index, world=accelerator.num_processes,
                         device=accelerator.device)


def timed(arm, steps: int, device: torch.device) -> tuple[int, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    images = arm.run(steps)
    sync()
    return images, time.perf_counter() - start


def profile_round(arm, steps: int, top: int) -> list[str]:
    prof = cProfile.Profile()
    prof.enable()
    arm.run(steps)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    return lines[lines.index(next(l for l in lines if "ncalls" in l)):]


def op_counts(arm, steps: int) -> dict[str, tuple[float, float]]:
    """torch.profiler over ``steps`` steps: op name -> (calls per step, self CPU microseconds per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        arm.run(steps)
    return {e.key: (e.count / steps, e.self_cpu_time_total / steps) for e in prof.key_averages()}


def op_diff(arms: dict, steps: int) -> list[dict]:
    """Ops that a recipe arm runs more (or less) often per step than the plain loop: the recipe's extra work."""
    plain = op_counts(arms["plain"], steps)
    out = []
    for name, arm in arms.items():
        if name == "plain":
            continue
        mine = op_counts(arm, steps)
        for op in sorted(set(mine) | set(plain)):
            (c1, t1), (c0, t0) = mine.get(op, (0, 0)), plain.get(op, (0, 0))
            if abs(c1 - c0) > 1e-9:
                out.append({"arm": name, "op": op, "calls_per_step": c1, "plain_calls_per_step": c0,
                            "self_cpu_us_per_step": t1, "plain_self_cpu_us_per_step": t0})
    return out


def extra_op_cost(ops: list[dict], arm: str) -> float:
    """Microseconds per step of the ops an arm runs beyond the plain loop: extra calls x the least-disturbed per-call time."""
    total = 0.0
    for o in ops:
        if o["arm"] != arm:
            continue
        per_call = [t / c for t, c in ((o["self_cpu_us_per_step"], o["calls_per_step"]),
                                       (o["plain_self_cpu_us_per_step"], o["plain_calls_per_step"])) if c > 0]
        total += (o["calls_per_step"] - o["plain_calls_per_step"]) * min(per_call)
    return total


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="measured rounds; each arm runs --steps steps per round")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per arm per round")
    p.add_argument("--interleave", choices=("step", "round"), default="step",
                   help="step: the arms take turns every step (robust to a noisy machine); round: every --steps steps")
    p.add_argument("--warmup-steps", type=int, default=10, help="untimed steps per arm before the first round")
    p.add_argument("--arms", default="recipe,plain",
                   help="comma-separated: recipe, plain, and patched variants: " + ", ".join(VARIANTS))
    p.add_argument("--recipe-args", default="",
                   help="extra recipe options, one string, e.g. \"--model resnet18 --augment flip\" "
                        "(default job: small_cnn, batch 128, SGD, cosine, Fashion-MNIST)")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile one round of each arm (top functions) and list the ops (torch.profiler) that "
                        "the recipe runs beyond the plain loop")
    p.add_argument("--profile-top", type=int, default=15, help="functions listed per profile")
    p.add_argument("--processes", type=int, default=1,
                   help="re-launch under accelerate launch with accelerate_configs/cpu_ddp.yaml and N processes")
    p.add_argument("--quick", action="store_true", help="tiny run (2 rounds of 3 steps) to check the script works")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/overhead_<N>proc.json)")
    p.add_argument("--plot", default=None, help="PNG plot (default docs/overhead_<N>proc.png; 'none' for no plot)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup_steps = 2, 3, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    recipe = common.load_recipe()
    scratch = tempfile.mkdtemp(prefix="overhead_")
    cfg = parse_config(recipe.Config, ["--tracker", "none", "--output-dir", scratch, *args.recipe_args.split()])
    accelerator = create_accelerator(cfg.grad_accum_steps, "none", scratch)
    if accelerator.distributed_type.value == "DEEPSPEED":
        raise SystemExit("overhead.py compares against a hand-written DDP loop: launch it without DeepSpeed "
                         "(zero_memory.py and scaling.py cover the ZeRO stages)")
    world, rank = accelerator.num_processes, accelerator.process_index
    data = build_data(cfg, rank, world, accelerator.device)
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    arms = {}
    for name in names:
        if name == "plain":
            arms[name] = PlainArm(cfg, accelerator, data)
        elif name == "recipe" or name in VARIANTS:
            arm = RecipeArm(recipe, cfg, accelerator, data)
            if name in VARIANTS:
                VARIANTS[name][1](arm)
            arm.name = name
            arms[name] = arm
        else:
            raise SystemExit(f"unknown arm {name!r}; choose from recipe, plain, {', '.join(VARIANTS)}")
    if "plain" not in arms or len(arms) < 2:
        raise SystemExit("--arms needs 'plain' and at least one recipe arm")

    say = accelerator.print
    say(f"overhead: {cfg.model}, batch {cfg.batch_size} per process, {world} process(es) x {torch.get_num_threads()} "
        f"thread(s), {args.rounds} rounds x {args.steps} steps per arm, arms {', '.join(arms)}")
    for arm in arms.values():  # warm-up: allocator, first-call costs
        arm.run(args.warmup_steps)

    rounds = []
    step_times = {name: [] for name in arms}  # seconds per image of every single step (step interleaving)
    for r in range(args.rounds):
        row = {"round": r + 1, "load_1min": common.load_average()[:1]}
        images = dict.fromkeys(arms, 0)
        seconds = dict.fromkeys(arms, 0.0)
        if args.interleave == "round":  # each arm runs its --steps in one go; the order flips every round
            for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
                images[name], seconds[name] = timed(arms[name], args.steps, accelerator.device)
        else:  # one step of each arm in turn (A B B A ...): noise slower than a step hits both alike
            for s in range(args.steps):
                for name in (list(arms) if (r + s) % 2 == 0 else list(reversed(arms))):
                    n, t = timed(arms[name], 1, accelerator.device)
                    images[name] += n
                    seconds[name] += t
                    step_times[name].append(t / n)
        for name in arms:
            row[name] = images[name] * world / seconds[name]
        rounds.append(row)
        say("  round {:2d}: ".format(r + 1) + "  ".join(f"{n} {row[n]:7.1f} img/s" for n in arms)
            + f"  recipe/plain {row['recipe'] / row['plain'] if 'recipe' in row else float('nan'):.3f}")

    recipe_arms = [n for n in arms if n != "plain"]
    summary = {}
    for name in recipe_arms:
        ratios = [row[name] / row["plain"] for row in rounds]
        summary[name] = {"median_images_per_sec": common.median(row[name] for row in rounds),
                         "median_ratio_to_plain": common.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)}
    summary["plain"] = {"median_images_per_sec": common.median(row["plain"] for row in rounds)}
    if step_times["plain"]:  # a second estimator, robust to single slow steps: ratio of the median step times
        for name in recipe_arms:
            summary[name]["ratio_of_median_step_times"] = common.median(step_times["plain"]) / common.median(step_times[name])

    profiles, ops = {}, []
    if args.profile:
        for name, arm in arms.items():
            profiles[name] = profile_round(arm, args.steps, args.profile_top)
        ops = op_diff(arms, args.steps)

    if not accelerator.is_main_process:
        return summary
    rows = [[name, summary[name]["median_images_per_sec"], summary[name].get("median_ratio_to_plain", 1.0),
             summary[name].get("min_ratio", 1.0), summary[name].get("max_ratio", 1.0)] for name in [*recipe_arms, "plain"]]
    print()
    print(common.table(rows, ["arm", "median img/s", "median ratio", "min ratio", "max ratio"]))
    ratio = summary["recipe"]["median_ratio_to_plain"] if "recipe" in summary else float("nan")
    print(f"\nrecipe / plain PyTorch (median of {args.rounds} interleaved rounds): {ratio:.3f}  "
          f"(target >= 0.95; foundation requirement >= 0.90)  load average {common.load_average()}")
    if "ratio_of_median_step_times" in summary.get("recipe", {}):
        print(f"ratio of median step times (robust to single slow steps): "
              f"{summary['recipe']['ratio_of_median_step_times']:.3f}")
    for name, lines in profiles.items():
        print(f"\ncProfile, one round of {args.steps} steps, arm {name} (top {args.profile_top} by own time):")
        print("\n".join(lines))
    if ops:
        print(f"\ntorch.profiler: ops whose count per step differs from the plain loop ({args.steps} steps; "
              "the counts are exact, the times noisy):")
        print(common.table([[o["arm"], o["op"][:60], f"{o['calls_per_step']:.2f}", f"{o['plain_calls_per_step']:.2f}",
                             f"{o['self_cpu_us_per_step']:.0f}", f"{o['plain_self_cpu_us_per_step']:.0f}"] for o in ops],
                           ["arm", "op", "calls/step", "plain calls/step", "self us/step", "plain self us/step"]))
        step_us = 1e6 * cfg.batch_size * world / max(1e-9, summary["plain"]["median_images_per_sec"])
        for name in recipe_arms:
            extra = extra_op_cost(ops, name)
            summary[name]["extra_ops_us_per_step"] = extra
            print(f"{name}: extra ops cost about {extra:.0f} us per step (count difference x the cheaper of the two "
                  f"arms' time per call), {extra / step_us:.2%} of a plain step ({step_us / 1e3:.1f} ms at the median "
                  "plain speed)")

    result = {
        "setup": {"model": cfg.model, "batch_size_per_process": cfg.batch_size, "processes": world,
                  "threads_per_process": torch.get_num_threads(), "dataset": cfg.dataset, "rounds": args.rounds,
                  "steps_per_round": args.steps, "interleave": args.interleave, "warmup_steps": args.warmup_steps, "arms": list(arms),
                  "recipe_args": args.recipe_args,
                  "variants": {n: VARIANTS[n][0] for n in arms if n in VARIANTS}},
        "rounds": rounds, "summary": summary, "ratio": ratio, "target": 0.95, "meets_target": ratio >= 0.95,
        "meets_foundation_requirement": ratio >= 0.90, "profiles": profiles, "op_diff": ops,
    }
    out = Path(args.out or common.RESULTS / f"overhead_{world}proc.json")
    common.write_result(out, result)
    print(f"wrote {out}")
    if (args.plot or "") != "none":
        plot = Path(args.plot or common.DOCS / f"overhead_{world}proc.png")
        make_plot(result, plot)
        print(f"wrote {plot}")
    return result


def make_plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    rounds = result["rounds"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["round"] for r in rounds]
    for name in result["setup"]["arms"]:
        ax1.plot(x, [r[name] for r in rounds], "o-", label=name)
    ax1.set_xlabel("round (arms interleaved)")
    ax1.set_ylabel("images / s")
    ax1.set_title(f"{result['setup']['model']}, batch {result['setup']['batch_size_per_process']}, "
                  f"{result['setup']['processes']} process(es)")
    ax1.legend()
    for name in result["setup"]["arms"]:
        if name != "plain":
            ax2.plot(x, [r[name] / r["plain"] for r in rounds], "o-", label=f"{name} / plain")
    ax2.axhline(0.95, color="g", ls="--", lw=1, label="target 0.95")
    ax2.axhline(0.90, color="r", ls=":", lw=1, label="requirement 0.90")
    ax2.set_xlabel("round")
    ax2.set_ylabel("ratio of images / s")
    ax2.set_title(f"median ratio {result['ratio']:.3f}")
    ax2.legend(fontsize=8)
    common.save_figure(fig, path, result)


if __name__ == "__main__":
    if parse_args().processes > 1 and not common.launched():
        sys.exit(common.relaunch(parse_args().processes))
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
