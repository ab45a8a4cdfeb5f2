"""Pack an image folder (`IMAGE_ROOT/<identity>/*.jpg|png`) into an MS1M-style train.rec/train.idx/property.

Usage: python tools/pack_rec.py IMAGE_ROOT OUT_DIR [--label-style scalar|face2rec2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from facebce.data.pack import pack_image_folder  # noqa: E402
from facebce.errors import FacebceError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image_root", help="folder with one subfolder of face crops per identity")
    parser.add_argument("out_dir", help="where train.rec, train.idx and property are written")
    parser.add_argument("--label-style", choices=("scalar", "face2rec2"), default="scalar",
                        help="image record label: class id (flag 0) or face2rec2's [class_id, 1.0]")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        summary = pack_image_folder(args.image_root, args.out_dir, label_style=args.label_style,
                                    progress=not args.quiet)
    except FacebceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    h, w = summary.image_size
    print(f"{args.out_dir}: {summary.num_classes} classes, {summary.num_images} images ({h}x{w}), "
          f"train.rec {summary.rec_bytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
