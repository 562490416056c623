"""`matryoshka-adaptor fit | apply | eval | export`: fit an adaptor, use it, compare it, ship it."""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np

from adaptor.cli.common import EXAMPLES, add_input_args, dims, load_inputs
from adaptor.stream import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_ROWS


def add_core_commands(sub) -> None:
  """Registers `fit`, `apply`, `eval` and `export` on the CLI's subparsers (`handler=fn(args)`)."""
  fit = sub.add_parser("fit", help="fit an adaptor on cached embeddings", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
  add_input_args(fit, with_beir=True)
  fit.add_argument("--split", default="train", help="qrels split used for training (BEIR input)")
  fit.add_argument("--supervised", action="store_true", help="train on qrels (two stages)")
  fit.add_argument("--no-queries", action="store_true",
                   help="do not use unlabeled query embeddings as anchors")
  fit.add_argument("--dims", type=dims, help="Matryoshka dims, e.g. 16,32,64,128,384")
  fit.add_argument("--d-out", type=int, help="adapted size (default: input size)")
  fit.add_argument("--hidden", type=int, help="residual MLP width (0: none)")
  fit.add_argument("--steps", type=int, help="max unsupervised steps (default: 25 passes over "
                   "the documents and queries, between 500 and 3000)")
  fit.add_argument("--start", choices=("auto", "pca-docs", "pca-docs-queries", "pca-centred"),
                   help="the reorder stage's closed-form start (default auto: the best of the "
                   "three on held-out anchors)")
  fit.add_argument("--supervised-steps", type=int, help="max supervised steps")
  fit.add_argument("--seed", type=int, default=0)
  fit.add_argument("--out", required=True, help="checkpoint directory, e.g. checkpoints/NAME")
  fit.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at --out (refused otherwise)")
  fit.add_argument("--eval-every", type=int,
                   help="validate (and save resume state) every N steps (default 200)")
  fit.add_argument("--resume-dir", help="where training state is kept to resume an interrupted "
                   "fit (default: <out>.train)")
  fit.add_argument("--quiet", action="store_true", help="no progress bar")
  fit.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first and run the same "
                   "command on every host (auto-configured on Cloud TPU, SLURM, Open MPI and "
                   "Kubernetes; elsewhere give --coordinator, --num-processes, --process-id)")
  fit.add_argument("--coordinator", help="HOST:PORT of process 0 (with --distributed)")
  fit.add_argument("--num-processes", type=int, help="number of processes (with --distributed)")
  fit.add_argument("--process-id", type=int, help="this process's id (with --distributed)")

  app = sub.add_parser(
      "apply", help="adapt embeddings: one .npy file, or streamed into resumable shards",
      description=(
          "Adapt embeddings with a fitted adaptor.\n\n"
          "--output FILE.npy: the input is adapted in memory into one .npy file.\n"
          "--output DIR: the inputs (.npy shards, Parquet files or a saved HF dataset;\n"
          "  directories and globs in sorted order) are streamed batch by batch into\n"
          "  DIR/part-NNNNN.npy (+ .ids.txt) or DIR/part-NNNNN.parquet shards and\n"
          "  DIR/manifest.json. Rerunning the same command after a crash resumes; the\n"
          "  result is byte-identical to an uninterrupted run."),
      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  app.add_argument("--checkpoint", required=True)
  app.add_argument("--input", required=True, nargs="+",
                   help=".npy, .npz, .parquet or saved HF dataset; for a directory output also "
                   "a directory or a quoted glob of .npy/.parquet shards (several allowed)")
  app.add_argument("--column", help="embedding column/array name")
  app.add_argument("--output", required=True,
                   help="FILE.npy (written atomically), or a directory for streamed shards")
  app.add_argument("--dim", type=int, help="output dims (default: all)")
  app.add_argument("--dtype", default="float32", choices=["float32", "float16"])
  app.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (a directory output: start over)")
  app.add_argument("--format", choices=["npy", "parquet"],
                   help="directory output: shard format (default npy, ids in part-NNNNN.ids.txt)")
  app.add_argument("--shard-rows", type=int,
                   help="directory output: rows per shard, the unit of resumption "
                   f"(default {DEFAULT_SHARD_ROWS})")
  app.add_argument("--id-column",
                   help="directory output: Parquet/dataset ids column to pass through "
                   "(.npy shards take ids from <stem>.ids.txt beside them)")
  app.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="rows per device call")
  app.add_argument("--quiet", action="store_true", help="no progress bar")

  ev = sub.add_parser("eval", help="compare raw truncation, PCA and adaptors per dim",
                      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_input_args(ev, with_beir=True)
  ev.add_argument("--split", default="test", help="qrels split to evaluate on (BEIR input)")
  ev.add_argument("--checkpoint", action="append", default=[],
                  help="adaptor checkpoint (repeatable; NAME=PATH to label it)")
  ev.add_argument("--dims", type=dims, help="dims to evaluate (default: 16,32,... and full)")
  ev.add_argument("--out", help="folder for results.json and the PNG plot")
  ev.add_argument("--overwrite", action="store_true",
                  help="replace results.json and ndcg10.png in --out (refused otherwise)")
  ev.add_argument("--quiet", action="store_true")

  ex = sub.add_parser(
      "export", help="write the adaptor for serving without JAX (safetensors or ONNX)",
      description=(
          "Write a fitted adaptor as safetensors (apply it with numpy alone: copy\n"
          "adaptor/portable.py into the service) or as an ONNX graph (input \"embeddings\"\n"
          "[batch, d_in] float32, output \"vectors\" [batch, dim], L2-normalised).\n"
          "See docs/serving.md."),
      epilog=("examples:\n  matryoshka-adaptor export --checkpoint checkpoints/scifact-minilm "
              "--format safetensors --out scifact.safetensors\n"
              "  matryoshka-adaptor export --checkpoint checkpoints/scifact-minilm --format onnx "
              "--dim 64 --out scifact-64.onnx\n"),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  ex.add_argument("--checkpoint", required=True)
  ex.add_argument("--format", required=True, choices=["safetensors", "onnx"])
  ex.add_argument("--out", required=True, help="output file (written atomically)")
  ex.add_argument("--dim", type=int, help="output width (default: d_out; smaller files are "
                  "faster and still exact for every prefix up to it)")
  ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  fit.set_defaults(handler=_cmd_fit)
  app.set_defaults(handler=_cmd_apply)
  ev.set_defaults(handler=_cmd_eval)
  ex.set_defaults(handler=_cmd_export)


def _cmd_fit(args):
  import jax

  import adaptor
  from adaptor import interrupts
  from adaptor.data import check_output

  if args.distributed:  # Before anything else touches jax's devices.
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

  check_output(args.out, name="--out", overwrite=args.overwrite)
  if args.qrels and not args.supervised:
    raise adaptor.InputError(f"--qrels {args.qrels} is used only by a supervised fit; add "
                             "--supervised, or drop --qrels")
  corpus, corpus_ids, queries, query_ids, qrels = load_inputs(args, args.split)
  overrides = {k: v for k, v in {
      "d_out": args.d_out, "hidden": args.hidden, "steps": args.steps,
      "supervised_steps": args.supervised_steps, "eval_every": args.eval_every,
      "start": args.start}.items()
      if v is not None}
  if args.supervised and qrels is None:
    raise adaptor.InputError("--supervised needs qrels (--beir, or --qrels with ids)")
  if args.no_queries:
    queries = None
  if args.dims is not None:
    from adaptor.model import check_dims
    check_dims(args.dims, args.d_out or corpus.shape[1], name="--dims")
  resume = args.resume_dir or os.fspath(args.out).rstrip("/") + ".train"
  # Ctrl-C and SIGTERM stop the fit after its current step, with its state kept.
  with interrupts.deferred(done=f"the fit had finished; saved to {args.out}"):
    model = adaptor.fit(
        corpus, dims=args.dims, queries=queries,
        qrels=qrels if args.supervised else None,
        query_ids=query_ids if args.supervised else None,
        corpus_ids=corpus_ids if args.supervised else None,
        seed=args.seed, checkpoint_dir=resume, keep_resume_state=True, quiet=args.quiet,
        **overrides)
    if jax.process_index() != 0:  # Every process holds the same adaptor; process 0 writes it.
      return
    model.save(args.out, overwrite=args.overwrite)
    shutil.rmtree(resume, ignore_errors=True)  # The fit is complete; its resume state is not needed.
  stages = {k: {"steps": v["steps"], "best_val": round(v["best_val"], 4)}
            for k, v in model.info["stages"].items()}
  print(f"saved {model!r} to {args.out} ({model.info['train_seconds']:.0f} s; stages {stages})")


def _cmd_apply(args):
  import glob

  import adaptor
  from adaptor import interrupts, stream
  from adaptor.data import InputError, atomic_file, check_output

  out = os.fspath(args.output)
  inputs = args.input
  if out.endswith((".npz", ".parquet", ".txt", ".json")):
    raise InputError(f"--output must be a .npy file or a directory, got {out}")
  if not out.endswith(".npy"):
    # A directory output: stream the inputs into resumable shards.
    model = adaptor.load(args.checkpoint)
    shard_rows = stream.DEFAULT_SHARD_ROWS if args.shard_rows is None else args.shard_rows
    with interrupts.deferred(done=f"the output in {out} had been completed"):
      m = stream.apply_files(
          model, inputs, out, dim=args.dim, dtype=args.dtype, output_format=args.format or "npy",
          column=args.column, id_column=args.id_column, shard_rows=shard_rows,
          batch_size=args.batch_size, overwrite=args.overwrite, quiet=args.quiet)
    cfg = m["config"]
    print(f"wrote {m['rows']} x {cfg['dim']} {cfg['dtype']} vectors in {m['n_shards']} "
          f"{cfg['format']} shards to {out} (manifest: {os.path.join(out, stream.MANIFEST)})")
    return

  # One .npy output: the input is adapted in memory.
  several = (len(inputs) > 1 or glob.has_magic(inputs[0])
             or (os.path.isdir(inputs[0]) and not stream.is_dataset_dir(inputs[0])))
  if several:
    raise InputError(f"--input {' '.join(inputs)} names several files; stream them into a "
                     f"directory (--output DIR), not into one file --output {out}")
  for flag, value in (("--format", args.format), ("--shard-rows", args.shard_rows),
                      ("--id-column", args.id_column)):
    if value is not None:
      raise InputError(f"{flag} applies to a directory output, got --output {out}")
  inp = inputs[0]
  check_output(out, name="--output", overwrite=args.overwrite)
  model = adaptor.load(args.checkpoint)
  emb = adaptor.load_embeddings(inp, column=args.column, name="--input")
  if emb.vectors.shape[1] != model.d_in:
    raise InputError(f"--input {inp}: adaptor {args.checkpoint} expects d={model.d_in}, "
                     f"got d={emb.vectors.shape[1]}")
  with interrupts.deferred():
    vectors = model.apply(emb.vectors, dim=args.dim, dtype=np.dtype(args.dtype),
                          batch_size=args.batch_size)
    interrupts.check(f"nothing written to {out}; rerun the command")
  try:
    with atomic_file(out, "wb") as f:
      np.save(f, vectors)
  except OSError as e:
    raise InputError(f"--output {out}: could not write: {e.strerror or e}") from None
  print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} {vectors.dtype} to {out}")


def _cmd_export(args):
  import adaptor

  model = adaptor.load(args.checkpoint)
  meta = model.export(args.out, format=args.format, dim=args.dim, overwrite=args.overwrite)
  print(f"wrote {args.format} {args.out}: d_in={meta['d_in']} -> dim={meta['dim']} "
        f"(dims {meta['dims']}, hidden={meta['hidden']}, {os.path.getsize(args.out)} bytes)")


def _cmd_eval(args):
  import adaptor
  from adaptor import evaluation
  from adaptor.data import check_output
  from adaptor.model import check_dims, default_dims

  if args.out:  # Before the table is computed, not after.
    check_output(args.out, name="--out", overwrite=args.overwrite,
                 members=("results.json", "ndcg10.png"))
  corpus, corpus_ids, queries, query_ids, qrels = load_inputs(args, args.split)
  if qrels is None:
    raise adaptor.InputError("eval needs qrels (--beir, or --qrels with ids)")
  d = corpus.shape[1]
  dims = check_dims(args.dims or default_dims(d), d, name="--dims")
  methods = {"raw": evaluation.Raw(),
             "pca": evaluation.PCA(corpus, center=False),
             "pca-centred": evaluation.PCA(corpus, center=True)}
  for spec in args.checkpoint:
    name, _, path = spec.rpartition("=")
    methods[name or os.path.basename(os.path.normpath(path))] = adaptor.load(path, d_in=d)
  results = evaluation.compare(methods, corpus, queries, query_ids=query_ids,
                               corpus_ids=corpus_ids, qrels=qrels, dims=dims)
  full = results["raw"][str(d)]["ndcg@10"]
  print(f"{len(query_ids)} queries, {corpus.shape[0]} documents, d={d}\n")
  print(evaluation.format_table(results, "ndcg@10", reference=full))
  print("\n(%) = share of the full-size raw nDCG@10\n")
  print(evaluation.format_table(results, "recall@100"))
  if args.out:
    evaluation.write_json({"dims": list(dims), "n_queries": len(query_ids), "results": results},
                          os.path.join(args.out, "results.json"))
    evaluation.plot(results, os.path.join(args.out, "ndcg10.png"), metric="ndcg@10",
                    title=f"nDCG@10 vs dims ({len(query_ids)} queries)")
    print(f"\nwrote {args.out}/results.json and {args.out}/ndcg10.png")
