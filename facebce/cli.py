"""`facebce` command line: a thin shell over the Python API (parse arguments, call, print).

This module is over 450 lines because it holds every subcommand's argparse options (train, eval,
calibrate, export, data, gallery, serve), each a few lines that name the Python call they feed;
splitting them by subcommand would scatter one command-line reference over many files."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from facebce import __version__
from facebce.errors import FacebceError

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


def _cmd_data_pairs(args) -> None:
    from facebce.data.pairs import build_pairs_bin, describe
    print(describe(build_pairs_bin(args.source, args.out, pairs=args.pairs, folds=args.folds, seed=args.seed,
                                   disjoint_folds=args.disjoint_folds)))


def _cmd_calibrate(args) -> None:
    from facebce.eval.calibrate import calibrate, drift_markdown
    cal = calibrate(_model_spec(args), _protocol_sets(args.sets), target_far=args.target_far, on=args.on,
                    pooled=args.pooled, replicates=args.bootstrap, seed=args.seed, flip=not args.no_flip,
                    cache_dir=args.cache, protocol_paths=args.protocols, out=args.out)
    print(drift_markdown(cal) + f"\n\ncalibration written to {cal.path} (drift report {cal.path.with_suffix('.md')}, "
          f"plot {cal.path.with_suffix('.png')}); use it with --threshold calibrated:{cal.path}")


def _protocol_sets(items) -> list[tuple[str, str]]:
    for item in items:
        if not all(item.partition("=")):
            raise FacebceError(f"{item!r}: expected PROTOCOL=PATH, e.g. lfw=data/lfw.bin")
    if not items:
        raise FacebceError("no evaluation sets given: add PROTOCOL=PATH arguments (see facebce eval --list)")
    return [tuple(item.partition("=")[::2]) for item in items]


def _cmd_models(args) -> None:
    from facebce.models import describe_backbones
    print(f"{'name':6} {'class':14} {'parameters':>12}  (embedding_size {args.embedding_size})")
    for row in describe_backbones(args.embedding_size):
        print(f"{row['name']:6} {row['class']:14} {row['parameters']:>12,}")


def _cmd_eval(args) -> None:
    from facebce.eval.protocols import describe_protocols
    from facebce.eval.report import to_markdown
    from facebce.eval.runner import evaluate
    if args.list:
        print(describe_protocols(args.protocols))
        return
    sets = _protocol_sets(args.sets)
    model = None if args.model == "-" else _model_spec(args)
    report = evaluate(model, sets, flip=not args.no_flip, threshold=args.threshold, bias=args.bias,
                      cache_dir=args.cache, out_dir=args.out, tar_mode=args.tar_mode,
                      model_name=args.model_name, protocol_paths=args.protocols)
    print(to_markdown(report))
    if args.cache and model is not None:
        print(f"\nembeddings cached in {args.cache}/{model.key}/; re-score without the model: "
              f"facebce eval - ... --cache {args.cache} --model-name {model.key}")
    if args.out:
        print(f"\nreport written to {args.out}/ (report.json, report.md, plots)")


def _cmd_train(args) -> None:
    if args.list:
        from facebce.resources import shipped_dir, shipped_names
        print(f"shipped recipes (in {shipped_dir('recipes')}; copy one to change it, `base: base.yaml` still works):")
        print("\n".join(f"  {name}" for name in shipped_names("recipes")))
        return
    if not args.recipe:
        raise FacebceError("train: give a recipe file or a shipped recipe's name (see facebce train --list)")
    from facebce.train import train_from_recipe
    r = train_from_recipe(args.recipe, overrides=args.set, resume=args.resume or args.resume_older,
                          resume_older=args.resume_older, init_backbone=args.init_backbone, out_dir=args.out)
    line = f"trained {r.steps} steps in {r.seconds:.0f} s; final loss {r.loss:.4f}"
    if r.threshold is not None:
        line += f"; learned threshold {r.threshold:.4f}"
    print(line)
    for name, metrics in (r.verification or {}).items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in metrics.items()))
    print(f"  run folder: {r.run_dir} (config.yaml, metrics.jsonl/.csv, checkpoints/, backbone.pth, model.json)")


def _model_spec(args):
    from facebce.eval.model_loading import ModelSpec
    from facebce.models.embedder import parse_channel_values
    return ModelSpec(args.model, arch=args.arch, embedding_size=args.embedding_size, color=args.color,
                     mean=parse_channel_values(args.mean, "--mean"), std=parse_channel_values(args.std, "--std"),
                     batch_size=args.batch_size)


def _cmd_export(args) -> None:
    from facebce.deploy.export import export_run, threshold_option
    threshold, provenance = ((None, None) if args.threshold is None
                             else threshold_option(args.threshold, model=args.model, arch=args.arch))
    report = export_run(args.model, args.out, arch=args.arch, embedding_size=args.embedding_size, threshold=threshold,
                        threshold_provenance=provenance, head=args.head, bias=args.bias,
                        variants=[v for v in args.variants.split(",") if v], opset=args.opset,
                        parity_bin=args.parity_bin, parity_images=args.parity_images,
                        calib_images=args.calib_images, calib_limit=args.calib_limit)
    print(report.summary())


def _cmd_gallery(args) -> None:
    from facebce.deploy import enrol
    from facebce.deploy.gallery import escape_name
    from facebce.deploy.stores import open_gallery
    from facebce.eval.calibrate import verified_threshold
    inputs, action = args.inputs, args.action
    if action == "info":
        with open_gallery(args.gallery, lock_timeout=args.lock_timeout) as store:
            for key, value in store.info().items():
                print(f"{key}: {value}")
        return
    if action == "remove":
        print(enrol.remove_entries(args.gallery, ids=args.ids, identity=args.identity, lock_timeout=args.lock_timeout))
        return
    if action == "migrate":
        if len(inputs) != 1:
            raise FacebceError("gallery migrate: give SRC DST (a path or a milvus:// / milvus+lite:// URI each)")
        print(enrol.migrate(args.gallery, inputs[0], lock_timeout=args.lock_timeout))
        return
    if action == "rename":
        if len(inputs) != 2:
            raise FacebceError("gallery rename: give GALLERY OLD_NAME NEW_NAME")
        with open_gallery(args.gallery, lock_timeout=args.lock_timeout) as store:
            n = store.rename(inputs[0], inputs[1])
        print(f"{args.gallery}: renamed {n} entries {escape_name(inputs[0])} -> {escape_name(inputs[1])}")
        return
    embedder = _model_spec(args).build(flip=not args.no_flip, normalize=True) if args.model else None
    args.threshold = verified_threshold(args.threshold, _model_spec(args) if args.model else None)
    if action == "set-threshold":
        if len(inputs) > 1 or (inputs and args.threshold is not None):
            raise FacebceError("gallery set-threshold: give GALLERY VALUE (or --threshold VALUE, or --model to "
                               "take the model's pair threshold)")
        value = verified_threshold(inputs[0], _model_spec(args) if args.model else None) if inputs else args.threshold
        if value is None and embedder is None:
            raise FacebceError("gallery set-threshold: give a value, --threshold or --model")
        print(enrol.set_gallery_threshold(args.gallery, value, embedder, lock_timeout=args.lock_timeout))
        return
    if embedder is None or not inputs:
        raise FacebceError(f"gallery {action}: give --model and at least one image folder or file")
    if action == "build":
        options = {k: v for k, v in (("nlist", args.nlist), ("nprobe", args.nprobe), ("pq_m", args.pq_m),
                                     ("pq_bits", args.pq_bits), ("refine", args.refine)) if v is not None}
        for summary in enrol.build_gallery(args.gallery, embedder, inputs, threshold=args.threshold,
                                           index_type=args.index, mode=args.mode, memory_gb=args.memory_gb,
                                           lock_timeout=args.lock_timeout, **options):
            print(summary)
    elif action == "add":
        for folder in inputs:
            print(enrol.enrol_folder(args.gallery, embedder, folder, lock_timeout=args.lock_timeout))
    else:
        print(enrol.format_results(enrol.search_files(args.gallery, embedder, inputs, k=args.k,
                                                      threshold=args.threshold, nprobe=args.nprobe)))


def _cmd_align(args) -> None:
    from facebce.deploy.align import FaceAligner, ScrfdDetector, align_folder
    aligner = FaceAligner(ScrfdDetector(args.detector, input_size=(args.det_size, args.det_size),
                                        det_thresh=args.det_thresh),
                          size=args.size, policy=args.policy, min_score=args.min_score)
    report = align_folder(args.src, args.dst, aligner)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items()))
    print(f"aligned {args.src} -> {args.dst} ({args.size}x{args.size}, policy {args.policy}): {counts}")
    print(f"  report: {Path(args.dst) / 'alignment_report.csv'} (one line per photo: status, faces, score, reason)")


def _cmd_serve(args) -> None:
    from facebce.serve import add_key, load_config, run
    if args.action:
        if args.action[:2] != ["keys", "add"] or len(args.action) != 3:
            raise FacebceError(f"serve {' '.join(args.action)}: expected 'facebce serve keys add NAME --scope "
                               f"read|enrol|admin --keys KEYS.json' (or no words: start the server)")
        if not args.scope or not args.keys:
            raise FacebceError("serve keys add: give --scope read|enrol|admin and --keys KEYS.json")
        key = add_key(args.keys, args.action[2], args.scope)
        print(f"added key {args.action[2]!r} (scope {args.scope}) to {args.keys}; it is shown only this once:\n{key}")
        return
    if args.scope:
        raise FacebceError("--scope belongs to 'facebce serve keys add NAME --scope ... --keys KEYS.json'")
    from dataclasses import fields

    from facebce.serve import ServeConfig
    cli = {f.name: getattr(args, f.name, None) for f in fields(ServeConfig)}
    run(load_config(cli, config_file=args.config))


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="*", help="nothing: start the server; 'keys add NAME': add an API key")
    p.add_argument("--config", help="YAML file of settings (the option names, with _ for -)")
    p.add_argument("--model", help="ONNX recognition model")
    p.add_argument("--gallery", help="gallery store: a path (created if missing) or a milvus URI")
    p.add_argument("--detector", help="SCRFD ONNX: photos that are not aligned crops are detected + aligned")
    p.add_argument("--keys", help="API keys file (salted hashes); without it: no auth, loopback only")
    p.add_argument("--scope", choices=["read", "enrol", "admin"], help="keys add: the new key's scope")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--color", choices=["rgb", "bgr"], help="channel order the model expects")
    p.add_argument("--mean", help="input mean on 0..255 pixels: one value or three")
    p.add_argument("--std", help="input std: one value or three")
    p.add_argument("--no-flip", dest="flip", action="store_const", const=False,
                   help="do not add the horizontally flipped embedding")
    p.add_argument("--threshold", help="threshold of a gallery the server creates (default: the model's metadata)")
    p.add_argument("--index", choices=["flat", "ivf", "hnsw"], help="index type of a gallery the server creates")
    p.add_argument("--policy", choices=["central", "largest", "best"], help="default face choice with a detector")
    p.add_argument("--det-size", type=int)
    p.add_argument("--det-thresh", type=float)
    p.add_argument("--min-score", type=float)
    for name in ("max-request-bytes", "max-image-pixels", "max-images", "max-k", "max-batch", "intra-op-threads"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--inference-sessions", type=int,
                   help="ONNX sessions embedding in parallel (default: measured at start, one on every core "
                        "vs one single-threaded session per core)")
    p.add_argument("--max-wait-ms", type=float, help="micro-batching: longest wait for more faces")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="backbone name for a .pth state_dict (r18 r34 r50 r100 r200 mbf)")
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--color", default="rgb", choices=["rgb", "bgr"], help="channel order the model expects")
    p.add_argument("--mean", help="input mean on 0..255 pixels: one value or three (model channel order)")
    p.add_argument("--std", help="input std: one value or three")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-flip", action="store_true", help="do not add the horizontally flipped embedding")


class _Parser(argparse.ArgumentParser):
    """Options may come before, between and after positionals (`eval MODEL --arch r50 lfw=x.bin`):
    a subcommand's own parser parses intermixed. Parsers with subcommands parse as usual (argparse's
    intermixed parsing does not take them)."""

    _intermixed_now = False

    def parse_known_args(self, args=None, namespace=None):
        leaf = not any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions())
        if leaf and not self._intermixed_now:
            self._intermixed_now = True  # parse_known_intermixed_args calls back in here
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixed_now = False
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="facebce", description=(
        "Open-set face recognition at a single global threshold: train, evaluate, deploy."))
    p.add_argument("--version", action="version", version=f"facebce {__version__}")
    p.add_argument("--verbose", action="store_true",
                   help="on an error, also print the traceback and underlying detail (default: one line)")
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
    s = dsub.add_parser("pairs", help="draw LFW-style verification pairs from a labelled folder or .rec pack")
    s.add_argument("source", help="labelled image folder ROOT/<identity>/*.jpg, or an MS1M-style pack (folder or .rec)")
    s.add_argument("out", help="output .bin (OUT.pairs.csv beside it names every image's source)")
    s.add_argument("--pairs", type=int, default=6000, help="number of pairs (a multiple of 2 x folds)")
    s.add_argument("--folds", type=int, default=10, help="contiguous folds, each half genuine then half impostor")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--disjoint-folds", action="store_true", help="no identity appears in two folds")
    s.set_defaults(func=_cmd_data_pairs)
    s = dsub.add_parser("inspect", help="summarise a .rec pack (folder or train.rec) or a verification .bin")
    s.add_argument("path")
    s.set_defaults(func=_cmd_data_inspect)

    m = sub.add_parser("models", help="list the registered backbones with their sizes")
    m.add_argument("--embedding-size", type=int, default=512)
    m.set_defaults(func=_cmd_models)

    t = sub.add_parser("train", help="train a backbone + head from a YAML recipe (torchrun for several processes)")
    t.add_argument("recipe", help="a YAML recipe file, or a shipped recipe's name (demo_synthetic; "
                                  "`facebce train --list` lists them)", nargs="?")
    t.add_argument("--list", action="store_true", help="list the shipped recipes (and where they are) and exit")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set optim.lr=0.05 --set data.batch_size=64")
    t.add_argument("--resume", action="store_true", help="continue exactly from the run folder's newest checkpoint")
    t.add_argument("--resume-older", action="store_true",
                   help="like --resume, but when the newest checkpoint is damaged, resume from the newest one that "
                        "loads (saying which was skipped and why) instead of refusing")
    t.add_argument("--init-backbone", help="start the backbone from an insightface .pth or a facebce checkpoint")
    t.add_argument("--out", help="run folder (default: the recipe's checkpoint.dir, else runs/<recipe name>)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a model at one global threshold beside the classic protocols")
    e.add_argument("model", nargs="?", default="-",
                   help="ONNX model or insightface-layout .pth (with --arch); '-' re-scores cached embeddings")
    e.add_argument("sets", nargs="*", metavar="PROTOCOL=PATH",
                   help="e.g. lfw=data/lfw.bin cfp_fp=data/cfp_fp.bin ijbc=data/IJBC open_set_folder=data/faces")
    e.add_argument("--list", action="store_true", help="list the known protocols and exit")
    _add_model_args(e)
    e.add_argument("--threshold", default="fit:union",
                   help="global threshold: fit:union, fit:<set>, fixed:<t>, bias (with --bias) or "
                        "calibrated:<calib.json>")
    e.add_argument("--bias", type=float, help="learned threshold of the model's head (b/gamma)")
    e.add_argument("--tar-mode", default="conservative",
                   choices=["insightface", "ijb_evals", "conservative", "interpolated"])
    e.add_argument("--cache", help="folder for cached embeddings (.npy); re-score later with model '-'")
    e.add_argument("--model-name", help="name of the cached model when re-scoring with '-'")
    e.add_argument("--protocols", action="append", default=[], help="extra protocol YAML file or folder")
    e.add_argument("--out", help="write report.json, report.md and PNG plots here (atomically)")
    e.set_defaults(func=_cmd_eval)

    c = sub.add_parser("calibrate", help="the global threshold at a target FAR, its bootstrap interval, and its "
                       "drift on other sets (writes calib.json)")
    c.add_argument("model", help="ONNX model, insightface-layout .pth (with --arch) or a facebce training run folder")
    c.add_argument("sets", nargs="+", metavar="PROTOCOL=PATH",
                   help="pairs sets (lfw=..., custom_bin=...), labelled folders (open_set_folder=ROOT), "
                   "IJB 1:1 sets (ijbc=DIR; resampled by subject)")
    _add_model_args(c)
    c.add_argument("--target-far", type=float, required=True, help="e.g. 1e-4")
    where = c.add_mutually_exclusive_group()
    where.add_argument("--on", help="calibrate on this set (default: the first)")
    where.add_argument("--pooled", action="store_true", help="calibrate on every pairs set pooled")
    c.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the 95 %% intervals (0: none)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    c.add_argument("--cache", help="embedding cache folder (shared with facebce eval --cache)")
    c.add_argument("--protocols", action="append", default=[], help="extra protocol YAML file or folder")
    c.add_argument("--out", required=True, help="calib.json to write (its drift report .md and plot .png beside it)")
    c.set_defaults(func=_cmd_calibrate)

    x = sub.add_parser("export", help="export a backbone to ONNX (parity-checked, insightface-loadable)")
    x.add_argument("model",
                   help="a facebce training run folder, or an insightface-layout state_dict (.pth) with --arch")
    x.add_argument("out", help="output .onnx path")
    x.add_argument("--arch", help="backbone name (r18 r34 r50 r100 r200 mbf)")
    x.add_argument("--embedding-size", type=int, default=512)
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--variants", default="",
                   help="also write these, as OUT_FOLDER/variants/<name>.<variant>.onnx: fp16,int8,int8-static")
    x.add_argument("--calib-images", help="int8-static: aligned face crops (a folder, searched recursively, or a .bin)")
    x.add_argument("--calib-limit", type=int, default=256, help="int8-static: at most this many calibration faces")
    x.add_argument("--parity-bin", help="verification .bin whose first images join the parity check")
    x.add_argument("--parity-images", type=int, default=32)
    x.add_argument("--head", help="training head, recorded in the metadata")
    x.add_argument("--bias", type=float, help="learned bias, recorded in the metadata")
    x.add_argument("--threshold", help="the PAIR threshold to deploy (cosine, e.g. 0.43, or calibrated:CALIB.json), "
                   "recorded as the model's `threshold`; without it none is recorded (the head's b/γ is "
                   "recorded apart, as learned_threshold)")
    x.set_defaults(func=_cmd_export)

    g = sub.add_parser("gallery", help="build, change and search a gallery with open-set rejection "
                                       "(FAISS on disk, or Milvus)")
    g.add_argument("action", choices=["build", "add", "search", "remove", "info", "set-threshold", "rename",
                                      "migrate"])
    g.add_argument("gallery", help="gallery: a path (FAISS, the default; files GALLERY, .json, .wal, .lock) or "
                                   "milvus://HOST:PORT/COLLECTION or milvus+lite://PATH.db/COLLECTION")
    g.add_argument("inputs", nargs="*", help="build/add: aligned folders ROOT/<identity>/*.jpg; search: image "
                                             "files; set-threshold: VALUE; rename: OLD NEW; migrate: DST")
    g.add_argument("--model", help="ONNX model or .pth (with --arch) that embeds the faces")
    _add_model_args(g)
    g.add_argument("--index", default="flat", choices=["flat", "ivf", "ivfpq", "opq", "hnsw", "auto"],
                   help="build: index type (auto: chosen from the number of images and --memory-gb)")
    g.add_argument("--memory-gb", type=float, help="build: memory budget for the index (auto, ivfpq, opq)")
    g.add_argument("--nlist", type=int, help="build: inverted lists of ivf/ivfpq/opq (default ~4 sqrt(N))")
    g.add_argument("--pq-m", type=int, help="build: sub-quantisers of ivfpq/opq codes (divides the dim; "
                                            "bytes per vector at --pq-bits 8)")
    g.add_argument("--pq-bits", type=int, choices=[4, 8], help="build: bits per sub-quantiser of ivfpq/opq codes "
                                                            "(4: FAISS fast-scan; default 8, or auto's choice)")
    g.add_argument("--refine", choices=["none", "sq8", "fp16", "flat"],
                   help="build: ivfpq/opq keep a copy of each vector at this precision and re-rank the codes' "
                        "shortlist on it (default none, or auto's choice)")
    g.add_argument("--nprobe", type=int, help="lists an ivf/ivfpq/opq search visits (build: the default; "
                                               "search: this time)")
    g.add_argument("--mode", default="all", choices=["all", "mean"], help="store every image or one mean per identity")
    g.add_argument("--threshold",
                   help="global cosine pair threshold or calibrated:CALIB.json (build: default the model's pair "
                        "threshold, said in one line; search: default the gallery's)")
    g.add_argument("-k", type=int, default=5, help="matches to show per probe")
    g.add_argument("--identity", help="remove: every entry of this identity")
    g.add_argument("--ids", help="remove: comma-separated entry ids")
    g.add_argument("--lock-timeout", type=float, default=30.0,
                   help="seconds to wait for another process writing the same gallery")
    g.set_defaults(func=_cmd_gallery)

    a = sub.add_parser("align", help="detect and align faces in raw photos (SCRFD + 5 points)")
    a.add_argument("src", help="folder of photos (ROOT/<identity>/*.jpg or flat)")
    a.add_argument("dst", help="output folder for aligned crops (mirrors SRC)")
    a.add_argument("--detector", required=True, help="SCRFD ONNX model, e.g. scrfd_2.5g_bnkps.onnx")
    a.add_argument("--policy", default="central", choices=["central", "largest", "best", "all"])
    a.add_argument("--size", type=int, default=112)
    a.add_argument("--det-size", type=int, default=320)
    a.add_argument("--det-thresh", type=float, default=0.3)
    a.add_argument("--min-score", type=float)
    a.set_defaults(func=_cmd_align)

    v = sub.add_parser("serve", help="HTTP service: enrol, identify, verify at the global threshold; API keys",
                       description="Settings also from --config YAML and FACEBCE_<SETTING> environment variables "
                                   "(options win over both).")
    _add_serve_args(v)
    v.set_defaults(func=_cmd_serve)
    return p


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """The API's warnings (a skipped 1:N, sizes that differ from the published ones) as one line each."""
    print(f"facebce: note: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _note
        try:
            args.func(args)
        except FacebceError as e:
            if getattr(args, "verbose", False):
                import traceback
                traceback.print_exc(file=sys.stderr)
            print(f"facebce: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("facebce: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `facebce eval --list | head`: the reader left; say nothing more
            sys.stdout = open(os.devnull, "w")
            return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
