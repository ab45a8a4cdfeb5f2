"""`facebce` command line: a thin shell over the Python API (parse arguments, call, print)."""
from __future__ import annotations

import argparse
import sys

from facebce import __version__
from facebce.errors import FacebceError

# Subcommands that later milestones own; they answer clearly instead of pretending.
PLANNED = {
    "train": "train a backbone + head from a YAML recipe",
    "eval": "evaluate a model on LFW-family, IJB-B/C and uniform-classification protocols",
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
