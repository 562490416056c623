"""The Matryoshka funnel inside Qdrant: one named vector per stage prefix, nested prefetches.

    vectors = model.apply(corpus_embeddings)                        # adapted [n, d], or read_shards
    qdrant.create_collection("scifact", dims=(32, 128, 384), path="qdrant-data",
                             quantization={32: "binary"})
    qdrant.upload("scifact", vectors, ids=doc_ids, path="qdrant-data")   # resumable
    scores, ids = qdrant.search("scifact", model.apply(query_embeddings), "32:500,128:50,384:10",
                                k=10, path="qdrant-data")

A collection holds, for each stage size m, a named vector "m{m}" (m32, m128,
m768, ...): the first m coordinates of the adapted vector, re-normalised, with
cosine distance. A funnel schedule like 32:500,128:50,768:10 (the library's
own syntax, `matryoshka-adaptor index search --schedule`) becomes nested
prefetches: the innermost searches m32 for 500 candidates, the next re-scores
those with m128 and keeps 50, and the query re-scores those with m768 and
returns the top k, exactly what `adaptor.funnel_search` computes when the
first stage is exact (always in local mode; on a server pass `exact=True`, or
raise `hnsw_ef` to approach it).

Where the data lives: `path=DIR` (the default way) runs Qdrant embedded in
this process, on disk in DIR (`path=":memory:"`: in memory); `url=` (and
`api_key=`, default the QDRANT_API_KEY environment variable) talks to a
server, e.g. `docker run -p 6333:6333 qdrant/qdrant`; or pass your own
`client=`. Local mode searches by brute force, has no HNSW, no quantisation,
no distribution, writes each point in its own SQLite transaction (slow
uploads) and is meant for tests and small data, not for benchmarking.

Points: the id of document `doc_id` is uuid5(NAMESPACE, doc_id), so a rerun
addresses the same points; its payload holds {"doc_id": doc_id} plus the
caller's payload. `upload` asks, batch by batch, which of the batch's points
already exist and uploads only the others, so after a crash or SIGKILL a rerun
with the same arguments uploads only what is missing and ends with the same
collection as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from adaptor.data import InputError, check_embeddings

NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/matryoshka-adaptor/doc-id")
QUANTIZATIONS = ("int8", "binary")
DEFAULT_BATCH = 256
# As adaptor.truncation.NORM_EPS: prefixes with a smaller norm become zero vectors.
_NORM_EPS = 1e-12


def vector_name(dim: int) -> str:
  """The named vector that holds the `dim`-prefix: "m32" for 32."""
  return f"m{int(dim)}"


def point_id(doc_id) -> str:
  """The Qdrant point id (a UUID string) of a document id."""
  return str(uuid.uuid5(NAMESPACE, str(doc_id)))


def _prefix(x: np.ndarray, dim: int) -> np.ndarray:
  """The first `dim` columns of `x` [n, d], rows re-normalised as `adaptor.truncate` does."""
  p = np.asarray(x[:, :dim], np.float32)
  sq = np.einsum("ij,ij->i", p, p)[:, None]
  ok = sq > _NORM_EPS**2
  return p * np.where(ok, 1.0 / np.sqrt(np.where(ok, sq, 1.0)), 0.0).astype(np.float32)


def _models():
  try:
    from qdrant_client import models
  except ImportError:
    raise InputError("Qdrant support needs qdrant-client: pip install "
                     "'matryoshka-adaptor[qdrant]'") from None
  return models


@contextlib.contextmanager
def connect(*, path=None, url: str | None = None, api_key: str | None = None, client=None):
  """Yields a QdrantClient: `client` as given, or one opened (and closed after) from path or url.

  Args:
    path: a folder for embedded local mode (":memory:" keeps it in memory).
    url: a Qdrant server, e.g. "http://localhost:6333".
    api_key: the server's API key (default: $QDRANT_API_KEY, if set).
    client: an open `qdrant_client.QdrantClient`, used and left open.
  """
  if client is not None:
    if path is not None or url is not None:
      raise InputError(f"give client= or path=/url=, not both (got path={path!r}, url={url!r})")
    yield client
    return
  if (path is None) == (url is None):
    raise InputError(f"give exactly one of path= (local mode) and url= (a server), got "
                     f"path={path!r}, url={url!r}")
  _models()
  from qdrant_client import QdrantClient
  if url is not None:
    opened = QdrantClient(url=url, api_key=api_key or os.environ.get("QDRANT_API_KEY"))
  elif os.fspath(path) == ":memory:":
    opened = QdrantClient(location=":memory:")
  else:
    opened = QdrantClient(path=os.fspath(path))
  try:
    yield opened
  finally:
    opened.close()


def _vectors_config(dims, quantization, hnsw_dims):
  models = _models()
  config = {}
  for m in dims:
    q = quantization.get(m)
    if q == "int8":
      qc = models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
          type=models.ScalarType.INT8, always_ram=True))
    elif q == "binary":
      qc = models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    else:
      qc = None
    # m=0: no HNSW graph for a vector that is only ever re-scored (later funnel stages).
    hnsw = None if hnsw_dims is None or m in hnsw_dims else models.HnswConfigDiff(m=0)
    config[vector_name(m)] = models.VectorParams(size=m, distance=models.Distance.COSINE,
                                                 quantization_config=qc, hnsw_config=hnsw)
  return config


def _collection_dims(client, collection: str) -> tuple[int, ...]:
  if not client.collection_exists(collection):
    raise InputError(f"collection {collection!r} must exist (create it with "
                     f"create_collection(collection, dims)), found none")
  vectors = client.get_collection(collection).config.params.vectors
  if not isinstance(vectors, Mapping) or not vectors:
    raise InputError(f"collection {collection!r}: expected named vectors m<dim>, found {vectors!r}")
  dims = []
  for name, params in vectors.items():
    if name != vector_name(params.size):
      raise InputError(f"collection {collection!r}: expected named vectors m<dim> (like m32 of "
                       f"size 32), found {name!r} of size {params.size}")
    dims.append(params.size)
  return tuple(sorted(dims))


def create_collection(collection: str, dims, *, quantization: Mapping[int, str] | None = None,
                      hnsw_dims=None, overwrite: bool = False, **where) -> bool:
  """Creates a collection with one cosine named vector per prefix size.

  An existing collection with the same named vectors is kept (so a rerun
  resumes its upload); one with others is refused unless `overwrite`.

  Args:
    collection: its name.
    dims: prefix sizes, e.g. (32, 128, 768); the largest is at most the
      adapted vectors' size.
    quantization: {dim: "int8" | "binary"}: Qdrant's scalar or binary
      quantisation of that named vector (servers only; local mode ignores it).
    hnsw_dims: the sizes that get an HNSW graph (default all); the others are
      only re-scored, which needs none (e.g. (32,) for 32:500,128:50,768:10).
    overwrite: delete and recreate an existing collection (start over).
    **where: path=, url=, api_key= or client= (see `connect`).

  Returns:
    True if it was created, False if an identical one was kept.
  """
  dims = tuple(sorted({int(m) for m in dims}))
  if not dims or dims[0] < 1:
    raise InputError(f"dims must be positive ints, got {dims}")
  quantization = {int(m): q for m, q in dict(quantization or {}).items()}
  for m, q in quantization.items():
    if m not in dims or q not in QUANTIZATIONS:
      raise InputError(f"quantization must map some of dims {list(dims)} to one of "
                       f"{list(QUANTIZATIONS)}, got {m}: {q!r}")
  if hnsw_dims is not None:
    hnsw_dims = {int(m) for m in hnsw_dims}
    if not hnsw_dims <= set(dims):
      raise InputError(f"hnsw_dims must be among dims {list(dims)}, got {sorted(hnsw_dims)}")
  with connect(**where) as client:
    if client.collection_exists(collection):
      try:
        found = _collection_dims(client, collection)
      except InputError:
        found = None
      if found == dims and not overwrite:
        return False
      if not overwrite:
        raise InputError(f"collection {collection!r} exists with prefix sizes {found}, expected "
                         f"{list(dims)}; pass overwrite=True to recreate it")
      client.delete_collection(collection)
    client.create_collection(collection, vectors_config=_vectors_config(dims, quantization, hnsw_dims))
  return True


def upload(collection: str, vectors, *, ids=None, payload=None, batch_size: int = DEFAULT_BATCH,
           quiet: bool = True, **where) -> dict:
  """Uploads adapted vectors; resumable: points already in the collection are skipped.

  Args:
    collection: a collection made by `create_collection`.
    vectors: adapted document vectors, with shape [n, d], d >= the largest
      prefix size of the collection (float32 or float16; e.g. `Adaptor.apply`
      output, or `read_shards`); each prefix is re-normalised.
    ids: n unique document ids (default "0" ... "n-1", as `MatryoshkaIndex`).
    payload: optional n dicts stored with the points (besides "doc_id").
    batch_size: points per request.
    quiet: no progress lines.
    **where: path=, url=, api_key= or client= (see `connect`).

  Returns:
    {"points": n, "uploaded": points sent now, "skipped": points already
    there, "seconds": wall time}.
  """
  models = _models()
  x = check_embeddings(vectors, name="vectors")
  n = x.shape[0]
  doc_ids = [str(i) for i in range(n)] if ids is None else [str(v) for v in ids]
  if len(doc_ids) != n or len(set(doc_ids)) != n:
    raise InputError(f"ids must be {n} unique ids (one per row of vectors), got {len(doc_ids)} "
                     f"with {len(set(doc_ids))} distinct")
  if payload is not None and len(payload) != n:
    raise InputError(f"payload must hold {n} dicts (one per row of vectors), got {len(payload)}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
  t0 = time.perf_counter()
  uploaded = skipped = 0
  with connect(**where) as client:
    dims = _collection_dims(client, collection)
    if x.shape[1] < dims[-1]:
      raise InputError(f"vectors must have at least {dims[-1]} columns (collection "
                       f"{collection!r} holds prefixes {list(dims)}), got shape {x.shape}")
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      pids = [point_id(v) for v in doc_ids[start:stop]]
      have = {str(p.id) for p in client.retrieve(collection, pids, with_payload=False,
                                                  with_vectors=False)}
      todo = [j for j, p in enumerate(pids) if p not in have]
      skipped += len(pids) - len(todo)
      if not todo:
        continue
      part = np.asarray(x[start:stop], np.float32)[todo]
      rows = [start + j for j in todo]
      client.upsert(collection, wait=True, points=models.Batch(
          ids=[pids[j] for j in todo],
          vectors={vector_name(m): _prefix(part, m).tolist() for m in dims},
          payloads=[{**(payload[r] if payload is not None else {}), "doc_id": doc_ids[r]}
                    for r in rows]))
      uploaded += len(todo)
      if not quiet:
        print(f"upload {collection}: {stop}/{n} rows ({uploaded} sent, {skipped} already there)",
              flush=True)
  return {"points": n, "uploaded": uploaded, "skipped": skipped,
          "seconds": time.perf_counter() - t0}


def upload_shards(collection: str, output_dir, **kwargs) -> dict:
  """Uploads the output of `adaptor.apply_files` (vectors and ids) with `upload`.

  The shards must hold at least the collection's largest prefix (apply with
  `dim` >= it). Without ids in the shards, ids are the row numbers.
  """
  from adaptor.stream import read_shards
  vectors, ids = read_shards(output_dir)
  return upload(collection, vectors, ids=ids, **kwargs)


def parse_schedule(schedule, dims: Sequence[int], *, k: int | None = None):
  """A schedule string "32:500,128:50,768:10" or (dim, keep) pairs, checked against `dims`."""
  from adaptor.search import parse_schedule as parse_schedule_text
  from adaptor.search import check_schedule
  if isinstance(schedule, str):
    try:
      schedule = parse_schedule_text(schedule)
    except InputError as e:
      raise InputError(f"schedule: {e}") from None
  stages = []
  for stage in schedule:
    if len(stage) == 3 and stage[2] != "float32":
      raise InputError(f"schedule stages must be DIM:KEEP (Qdrant's quantisation is a property of "
                       f"the collection: create_collection(quantization=)), got {stage!r}")
    stages.append(tuple(stage[:2]))
  try:
    stages = check_schedule(stages, max(dims), k=k)
  except (TypeError, ValueError) as e:
    raise InputError(f"schedule: {e}") from None
  missing = [m for m, _, _ in stages if m not in dims]
  if missing:
    raise InputError(f"schedule dims must be prefix sizes of the collection {list(dims)}, got "
                     f"{missing}")
  return tuple((m, keep) for m, keep, _ in stages)


def _request(q: np.ndarray, stages, k: int, exact: bool, hnsw_ef: int | None):
  """A QueryRequest for one adapted query [d]: stage 1 innermost, the last stage on top."""
  models = _models()
  params = models.SearchParams(exact=exact, hnsw_ef=hnsw_ef) if (exact or hnsw_ef) else None
  vec = lambda m: _prefix(q[None], m)[0].tolist()
  inner = None
  for i, (m, keep) in enumerate(stages[:-1]):
    inner = models.Prefetch(query=vec(m), using=vector_name(m), limit=keep, prefetch=inner,
                            params=params if i == 0 else None)
  m = stages[-1][0]
  return models.QueryRequest(query=vec(m), using=vector_name(m), limit=k, prefetch=inner,
                             params=params if inner is None else None, with_payload=["doc_id"])


def search(collection: str, queries, schedule, *, k: int | None = None, adaptor=None,
           exact: bool = False, hnsw_ef: int | None = None, batch_size: int = 64,
           **where) -> tuple[np.ndarray, np.ndarray]:
  """Funnel search in Qdrant; returns what `MatryoshkaIndex.search(schedule=)` returns.

  Args:
    collection: a collection made by `create_collection` and `upload`.
    queries: adapted query vectors, with shape [n_queries, d] (d >= the
      schedule's last dim), or raw embeddings [n_queries, d_in] with `adaptor`.
    schedule: "32:500,128:50,768:10" or [(32, 500), (128, 50), (768, 10)];
      every dim must be a prefix size of the collection.
    k: results per query (default: the last stage's keep, which must be >= k).
    adaptor: an `Adaptor` or `adaptor.portable.PortableAdaptor` applied to
      the queries first.
    exact: the first stage searches exactly, not through HNSW (servers; local
      mode is always exact).
    hnsw_ef: the first stage's HNSW beam width (servers).
    batch_size: queries per request.
    **where: path=, url=, api_key= or client= (see `connect`).

  Returns:
    (scores, ids): float32 cosine scores at the last stage's prefix [n_queries,
    k] and an object array of document ids [n_queries, k], best first (None
    and -inf where the collection holds fewer than k points).
  """
  q = check_embeddings(queries, name="queries")
  if adaptor is not None:
    q = adaptor.apply(q)
  q = np.asarray(q, np.float32)
  with connect(**where) as client:
    dims = _collection_dims(client, collection)
    stages = parse_schedule(schedule, dims, k=k)
    if q.shape[1] < stages[-1][0]:
      raise InputError(f"queries must have at least {stages[-1][0]} columns (the schedule's last "
                       f"dim), got shape {q.shape}")
    k = stages[-1][1] if k is None else k
    scores = np.full((q.shape[0], k), -np.inf, np.float32)
    ids = np.full((q.shape[0], k), None, object)
    for start in range(0, q.shape[0], batch_size):
      requests = [_request(row, stages, k, exact, hnsw_ef) for row in q[start:start + batch_size]]
      for i, res in enumerate(client.query_batch_points(collection, requests=requests), start):
        for j, p in enumerate(res.points):
          scores[i, j], ids[i, j] = p.score, p.payload["doc_id"]
  return scores, ids
