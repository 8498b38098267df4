from tests.cluster_support import cluster

__all__ = ["cluster"]
