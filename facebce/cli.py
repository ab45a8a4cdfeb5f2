"""`facebce` command line: a thin shell over the Python API (parse arguments, call, print)."""
from __future__ import annotations

import argparse
import sys

from facebce import __version__
from facebce.errors import FacebceError

# Subcommands that later milestones own; they answer clearly instead of pretending.
PLANNED = {
    "train": "train a backbone + head from a YAML recipe",
    "export": "export a backbone to ONNX with parity checks",
    "gallery": "build and search a FAISS gallery with open-set rejection",
    "align": "detect and align faces in raw photos (SCRFD + 5 points)",
}


def _cmd_data_synth(args) -> None:
    from facebce.data.tools import synthesize
    print(synthesize(args.out, identities=args.identities, images=args.images, seed=args.seed,
                     first_identity=args.first_identity, rec=args.rec, pairs=args.pairs,
                     pair_identities=args.pair_identities))


def _cmd_data_pack(args) -> None:
    from facebce.data.tools import pack
    print(pack(args.image_root, args.out_dir))


def _cmd_data_inspect(args) -> None:
    from facebce.data.tools import inspect_data
    print(inspect_data(args.path))


def _cmd_models(args) -> None:
    from facebce.models import describe_backbones
    print(f"{'name':6} {'class':14} {'parameters':>12}  (embedding_size {args.embedding_size})")
    for row in describe_backbones(args.embedding_size):
        print(f"{row['name']:6} {row['class']:14} {row['parameters']:>12,}")


def _floats(text: str | None):
    """'127.5' -> 127.5; '123.675,116.28,103.53' -> a per-channel tuple."""
    if text is None:
        return None
    values = tuple(float(v) for v in text.split(","))
    return values[0] if len(values) == 1 else values


def _cmd_eval(args) -> None:
    from facebce.eval.protocols import describe_protocols
    from facebce.eval.report import to_markdown
    from facebce.eval.runner import evaluate
    from facebce.eval.model_loading import ModelSpec
    if args.list:
        print(describe_protocols(args.protocols))
        return
    sets = []
    for item in args.sets:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise FacebceError(f"{item!r}: expected PROTOCOL=PATH, e.g. lfw=data/lfw.bin")
        sets.append((name, path))
    if not sets:
        raise FacebceError("no evaluation sets given: add PROTOCOL=PATH arguments (see --list)")
    model = None
    if args.model != "-":
        model = ModelSpec(args.model, arch=args.arch, embedding_size=args.embedding_size, color=args.color,
                          mean=_floats(args.mean), std=_floats(args.std), batch_size=args.batch_size)
    from facebce.deploy.align import norm_crop  # IJB crops are aligned on the fly
    report = evaluate(model, sets, flip=not args.no_flip, threshold=args.threshold, bias=args.bias,
                      cache_dir=args.cache, out_dir=args.out, tar_mode=args.tar_mode,
                      model_name=args.model_name, protocol_paths=args.protocols, align=norm_crop)
    print(to_markdown(report))
    if args.cache and model is not None:
        print(f"\nembeddings cached in {args.cache}/{model.key}/; re-score without the model: "
              f"facebce eval - ... --cache {args.cache} --model-name {model.key}")
    if args.out:
        print(f"\nreport written to {args.out}/ (report.json, report.md, plots)")


def _planned(name):
    def run(args) -> None:
        raise FacebceError(f"'facebce {name}' is not yet available in facebce {__version__}")
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facebce", description=(
        "Open-set face recognition at a single global threshold: train, evaluate, deploy."))
    p.add_argument("--version", action="version", version=f"facebce {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="make, pack and inspect face data sets (.rec, .bin, folders)")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = dsub.add_parser("synth", help="generate synthetic identities (image folder, optional .rec and .bin)")
    s.add_argument("out", help="output folder")
    s.add_argument("--identities", type=int, default=50)
    s.add_argument("--images", type=int, default=10, help="images per identity")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--first-identity", type=int, default=0,
                   help="id of the first identity (use disjoint ranges for train and test)")
    s.add_argument("--rec", action="store_true", help="also pack the folder as train.rec/.idx/property")
    s.add_argument("--pairs", type=int, default=0, help="also write verification pairs to OUT/pairs.bin")
    s.add_argument("--pair-identities", type=int, default=0,
                   help="draw the pairs from this many further, held-out identities (0: the same ones)")
    s.set_defaults(func=_cmd_data_synth)
    s = dsub.add_parser("pack", help="pack IMAGE_ROOT/<identity>/*.jpg into train.rec/.idx/property")
    s.add_argument("image_root")
    s.add_argument("out_dir")
    s.set_defaults(func=_cmd_data_pack)
    s = dsub.add_parser("inspect", help="summarise a .rec pack (folder or train.rec) or a verification .bin")
    s.add_argument("path")
    s.set_defaults(func=_cmd_data_inspect)

    m = sub.add_parser("models", help="list the registered backbones with their sizes")
    m.add_argument("--embedding-size", type=int, default=512)
    m.set_defaults(func=_cmd_models)

    e = sub.add_parser("eval", help="evaluate a model at one global threshold beside the classic protocols")
    e.add_argument("model", nargs="?", default="-",
                   help="ONNX model or insightface-layout .pth (with --arch); '-' re-scores cached embeddings")
    e.add_argument("sets", nargs="*", metavar="PROTOCOL=PATH",
                   help="e.g. lfw=data/lfw.bin cfp_fp=data/cfp_fp.bin ijbc=data/IJBC")
    e.add_argument("--list", action="store_true", help="list the known protocols and exit")
    e.add_argument("--arch", help="backbone name for a .pth state_dict (r18 r34 r50 r100 r200 mbf)")
    e.add_argument("--embedding-size", type=int, default=512)
    e.add_argument("--color", default="rgb", choices=["rgb", "bgr"], help="channel order the model expects")
    e.add_argument("--mean", help="input mean on 0..255 pixels: one value or three (model channel order)")
    e.add_argument("--std", help="input std: one value or three")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--no-flip", action="store_true", help="do not add the horizontally flipped embedding")
    e.add_argument("--threshold", default="fit:union",
                   help="global threshold: fit:union, fit:<set>, fixed:<t> or bias (with --bias)")
    e.add_argument("--bias", type=float, help="learned threshold of the model's head (b/gamma)")
    e.add_argument("--tar-mode", default="conservative",
                   choices=["insightface", "ijb_evals", "conservative", "interpolated"])
    e.add_argument("--cache", help="folder for cached embeddings (.npy); re-score later with model '-'")
    e.add_argument("--model-name", help="name of the cached model when re-scoring with '-'")
    e.add_argument("--protocols", action="append", default=[], help="extra protocol YAML file or folder")
    e.add_argument("--out", help="write report.json, report.md and PNG plots here (atomically)")
    e.set_defaults(func=_cmd_eval)

    for name, help_text in PLANNED.items():
        q = sub.add_parser(name, help=f"{help_text} (not yet available)")
        q.add_argument("rest", nargs=argparse.REMAINDER)
        q.set_defaults(func=_planned(name))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FacebceError as e:
        print(f"facebce: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("facebce: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
