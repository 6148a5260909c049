"""`veilcam train`, `veilcam evaluate`, `veilcam realcheck`: the default action model's life cycle.

Kept thin: argument parsing and reporting only; the work is in the `training` package (which is
not part of the enclave's trusted file set).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODEL = str(Path(__file__).resolve().parents[2] / "samples" / "default_model")


def _cmd_train(args: argparse.Namespace) -> int:
    from training.synth import CLASSES
    from training.train import TrainConfig, train

    cfg = TrainConfig(
        seed=args.seed,
        epochs=args.epochs,
        train_per_epoch=args.train_per_epoch,
        val_size=args.val_size,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        T=args.T,
        fps=args.fps,
        M=args.M,
        stride=args.stride,
        threads=args.threads,
        device=args.device,
        precision=args.precision,
        label_smoothing=args.label_smoothing,
        input_transform=args.input_transform,
        ema_decay=args.ema_decay,
        init_from=args.init_from or "",
        real_windows=args.real_windows or "",
        real_fraction=args.real_fraction,
        classes=CLASSES,
    )
    command = (
        "veilcam " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if args.command_line is None
        else args.command_line
    )
    hist = train(
        cfg,
        args.out,
        resume=args.resume,
        package_dir=args.package,
        command=command,
        progress=not args.no_progress,
        keep_epochs=args.keep_epochs,
    )
    pkg = Path(args.package or args.out)
    print(
        f"best val acc {hist['best_val_acc']:.3f} at epoch {hist['best_epoch'] + 1}; "
        f"{hist['train_s'] / 60:.1f} min; package in {pkg}"
    )
    if args.test_size > 0:
        from training.evaluate import evaluate_package

        res = evaluate_package(
            pkg,
            n=args.test_size,
            seed=args.seed,
            report_dir=Path(args.out) / "eval",
            update_model_json=True,
            threads=args.threads,
        )
        print(f"held-out accuracy {res['accuracy']:.3f} (n={res['n']}); report in {Path(args.out) / 'eval'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_package

    res = evaluate_package(
        args.model,
        n=args.n,
        seed=args.seed,
        report_dir=args.out,
        update_model_json=args.update_model_json,
        threads=args.threads,
    )
    print(Path(args.out, "metrics.md").read_text(encoding="utf-8"))
    print(
        f"held-out accuracy {res['accuracy']:.3f} (n={res['n']}); "
        f"confusion matrix {Path(args.out) / 'confusion.png'}"
    )
    return 0


def _summary(scores: dict[str, Any], prefix: str = "") -> str:
    """One line of realcheck totals."""
    return (
        f"{prefix}fall recall {scores['falls_found']}/{scores['falls']}; "
        f"false fall alerts {scores['false_fall_alerts']} in {scores['fall_free_s']:.0f} s of fall-free "
        f"footage ({scores['false_fall_alerts_per_hour']}/h); "
        f"alerts outside falls in fall clips {scores['alerts_outside_falls']}; "
        f"top-1 agreement {scores['agreement']} over {scores['scored_windows']} windows; "
        f"lying still read lying {scores['lying_agreement']} of {scores['lying_windows']} windows"
    )


def _cmd_realcheck(args: argparse.Namespace) -> int:
    from training.annotations import confusion_png, format_confusion
    from training.realcheck import export_windows, run_realcheck

    if args.export_windows:
        if not args.annotations or not args.clips:
            print(
                "--export-windows needs --annotations and the annotated clip names to export", file=sys.stderr
            )
            return 2
        from training.evaluate import load_package

        _, labels, meta = load_package(args.model)
        counts = export_windows(
            args.annotations,
            args.clips,
            args.export_windows,
            meta,
            args.clips_dir,
            cache_dir=args.cache,
            classes=labels,
        )
        for k, v in sorted(counts.items()):
            print(f"  {k}: {v} windows")
        print(f"{sum(counts.values())} windows in {args.export_windows}")
        return 0

    report: dict[str, Any] = run_realcheck(
        args.model,
        args.clips,
        cache_dir=args.cache,
        threads=args.threads,
        min_score=args.min_score,
        config=args.config,
        annotations=args.annotations,
        clips_dir=args.clips_dir,
    )
    scores = report.get("scores")
    if scores is not None and args.png:
        confusion_png(scores, args.png, title=Path(args.model).name)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"rules: {json.dumps(report['rules'])}")
    for clip in report["clips"]:
        print(
            f"{clip['clip']}: {clip['frames']} frames, {len(clip['windows'])} windows, "
            f"{clip['fall_windows']} falling (max p {clip['max_fall_p']:.2f}), "
            f"{clip['fall_alerts']} fall alert(s); pose {clip['pose_s']:.1f} s"
        )
        for w in clip["windows"]:
            top = ", ".join(f"{lab} {p:.2f}" for lab, p in w["top"])
            mark = "  ALERT" if w["alert"] else ""
            print(f"  {w['t0']:6.1f}-{w['t1']:5.1f} s  track {w['track']:>3}  {top}{mark}")
    if scores is not None:
        print()
        trained = set(report.get("real_clips", []))
        print(f"{'clip':<44} {'split':<9} {'falls':>5} {'found':>5} {'false':>5} {'agree':>6} {'lying':>7}")
        for c in scores["clips"]:
            agree = "-" if c["agreement"] is None else f"{c['agreement']:.2f}"
            lying = f"{c['lying_read_lying']}/{c['lying_windows']}" if c["lying_windows"] else "-"
            split = "trained" if c["clip"] in trained else "held-out"
            print(
                f"{c['clip']:<44} {split:<9} {c['falls']:>5} {c['falls_found']:>5} "
                f"{c['false_fall_alerts']:>5} {agree:>6} {lying:>7}"
            )
        for name, sc in (
            ("", scores),
            ("held-out clips: ", report.get("scores_held_out")),
            ("trained-on clips: ", report.get("scores_trained_on")),
        ):
            if sc:
                print(_summary(sc, name))
        print(format_confusion(scores))
        if args.sweep:
            from training.annotations import load_annotations
            from training.realcheck import rule_sweep

            print("falling rule sweep (other rules as above):")
            print(f"  {'min_score':>9} {'windows':>7}  {'all clips':<28} held-out clips")
            for row in rule_sweep(report, load_annotations(args.annotations), scores["labels"]):
                cells = [
                    f"{r['falls_found']}/{r['falls']} falls, {r['false_fall_alerts']} false "
                    f"({r['false_fall_alerts_per_hour']}/h)"
                    for r in (row.get("all"), row.get("held_out"))
                    if r
                ]
                print(f"  {row['min_score']:>9.2f} {row['min_windows']:>7}  " + "   ".join(cells))
        if args.png:
            print(f"confusion matrix: {args.png}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from training.package import import_checkpoint

    meta = import_checkpoint(
        args.checkpoint,
        args.labels,
        args.out,
        T=args.T,
        stride=args.stride,
        fps=args.fps,
        M=args.M,
        strategy=args.strategy,
    )
    print(
        f"package {args.out}: {meta['num_class']} classes, layout {meta['layout']}, "
        f"T={meta['T']} stride={meta['stride']} fps={meta['fps']}"
    )
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `train`, `evaluate`, `import-model` and `realcheck` to the `veilcam` parser."""
    p = sub.add_parser("train", help="train the default action model on synthetic skeletons")
    p.add_argument("--out", default="runs/default", help="run directory (checkpoint.pt, eval/)")
    p.add_argument("--package", default=None, help="also write model.pt/labels.txt/model.json here")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-per-epoch", type=int, default=2700, help="fresh synthetic windows per epoch")
    p.add_argument("--val-size", type=int, default=450)
    p.add_argument(
        "--test-size", type=int, default=900, help="held-out windows evaluated at the end (0: skip)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warm-up, then cosine decay)")
    p.add_argument("--T", type=int, default=30, help="window length in frames")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate windows are sampled at")
    p.add_argument("--M", type=int, default=2, help="person slots per window")
    p.add_argument("--stride", type=int, default=10, help="window stride in frames (recorded for the daemon)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0 …")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: mixed precision (autocast), ≈2× faster on CPUs with AVX512-BF16/AMX and on recent GPUs",
    )
    p.add_argument(
        "--input-transform",
        choices=["reference", "person-centred"],
        default="reference",
        help="what the enclave applies to a window before ST-GCN (recorded in model.json)",
    )
    p.add_argument(
        "--ema-decay", type=float, default=0.0, help="ship an EMA of the weights (e.g. 0.998; 0 = off)"
    )
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--init-from", default=None, help="fine-tune: start from this package dir or model.pt (same classes)"
    )
    p.add_argument(
        "--real-windows", default=None, help="npz of annotated real windows (realcheck --export-windows)"
    )
    p.add_argument(
        "--real-fraction", type=float, default=0.0, help="real windows per synthetic window each epoch"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--keep-epochs", action="store_true", help="also write each epoch's package to OUT/epoch_N"
    )
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a model package on held-out synthetic windows")
    e.add_argument("--model", default=DEFAULT_MODEL, help="package dir (model.pt, labels.txt, model.json)")
    e.add_argument("--n", type=int, default=900)
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--out", default="runs/eval", help="report dir: confusion.png, metrics.json, metrics.md")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--update-model-json", action="store_true", help="store the metrics in model.json")
    e.set_defaults(func=_cmd_evaluate)

    i = sub.add_parser("import-model", help="make a model package from a reference ST-GCN checkpoint")
    i.add_argument("checkpoint", help="e.g. st_gcn.kinetics.pt or st_gcn.ntu-xsub.pt (reference state_dict)")
    i.add_argument("--labels", required=True, help="label map, one label a line in classifier order")
    i.add_argument("--out", required=True, help="package directory to write")
    i.add_argument("--T", type=int, default=300, help="window length in frames (reference demo: 300)")
    i.add_argument("--stride", type=int, default=30)
    i.add_argument("--fps", type=float, default=30.0)
    i.add_argument("--M", type=int, default=2)
    i.add_argument("--strategy", default="spatial", choices=["uniform", "distance", "spatial"])
    i.set_defaults(func=_cmd_import)

    r = sub.add_parser("realcheck", help="run pose + the model over real clips and print per-window labels")
    r.add_argument("clips", nargs="*", help="video files (default: the fall and pedestrian samples)")
    r.add_argument("--model", default=DEFAULT_MODEL)
    r.add_argument("--cache", default=None, help="skeleton cache dir (default: ~/.cache/veilcam/realcheck)")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument(
        "--min-score", type=float, default=None, help="override the rules' min_score (default: the config's)"
    )
    r.add_argument(
        "--config",
        default=None,
        help="veilcam config whose rules and window settings apply (default: defaults)",
    )
    r.add_argument(
        "--annotations",
        default=None,
        help="ground-truth CSV (training/annotations.py format); clips default to the annotated ones",
    )
    r.add_argument(
        "--clips-dir", default=None, help="annotated clip paths are relative to this (default: its dir)"
    )
    r.add_argument("--png", default=None, help="with --annotations: save the confusion matrix here")
    r.add_argument(
        "--sweep",
        action="store_true",
        help="with --annotations: fall recall / false alerts for a grid of falling min_score × min_windows",
    )
    r.add_argument(
        "--export-windows",
        default=None,
        metavar="NPZ",
        help="save the annotated windows (stride 1) of the named clips for train --real-windows",
    )
    r.set_defaults(func=_cmd_realcheck)


__all__ = ["register"]
