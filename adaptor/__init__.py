"""matryoshka-adaptor: make the embeddings of a frozen model truncatable.

    import adaptor
    model = adaptor.fit(corpus_embeddings, dims=(16, 32, 64, 128), seed=0)
    vectors = model.apply(embeddings, dim=64)            # [n, 64], unit norm
    model.save("checkpoints/scifact"); model = adaptor.load("checkpoints/scifact")
    adaptor.apply_files(model, "embeddings/*.npy", "adapted/", dim=64, dtype="float16")

The Apache Beam pipeline lives in `adaptor.beam` (extra `beam`), imported on demand.
"""

from adaptor._version import __version__

from adaptor.api import Adaptor, load
from adaptor.checkpoint import CheckpointError
from adaptor.data import Embeddings, InputError, load_beir, load_embeddings, load_qrels
from adaptor.metrics import evaluate, evaluate_topk
from adaptor.model import AdaptorConfig, MatryoshkaAdaptor, default_dims
from adaptor.index import MatryoshkaIndex
from adaptor.plan import BudgetPlan, Grid, Plan, plan_budget, plan_schedule
from adaptor.search import Stage, exact_search, funnel_search, parse_schedule
from adaptor.truncation import l2_normalize, prefix_inv_norms, truncate
from adaptor.stream import apply_files, read_shards
from adaptor.train import LossWeights, TrainConfig, fit
