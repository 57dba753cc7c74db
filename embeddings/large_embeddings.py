"""The seed's `LargeEmbeddings` module, materialised on a real device so that it can serve.

As in the-algorithm-ml's `common/modules/embedding/embedding.py`: one torchrec `EmbeddingBagConfig` per table with
`feature_names=[name]`, SUM pooling, the table's data type, one `EmbeddingBagCollection` at `ebc`, and the output
`KeyedTensor` passing through `surgery_cut_point` (an `nn.Identity`). State-dict keys are the seed's
(`ebc.embedding_bags.<table>.weight`). Tables marked `weighted: true` live in a second, weighted collection
(`weighted_ebc`, torchrec's `is_weighted=True`), since torchrec weights a whole collection or none of it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec import EmbeddingBagConfig as TorchrecTableConfig
from torchrec.modules import embedding_configs
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .config import DataType, EmbeddingBagConfig, LargeEmbeddingsConfig, canonical_keys

__all__ = ["LargeEmbeddings", "canonical_keys"]

logger = logging.getLogger(__name__)


def _torchrec_table(table: EmbeddingBagConfig) -> TorchrecTableConfig:
    data_type = embedding_configs.DataType.FP32 if table.data_type is DataType.FP32 else embedding_configs.DataType.FP16
    return TorchrecTableConfig(
        embedding_dim=table.embedding_dim,
        feature_names=[table.name],
        name=table.name,
        num_embeddings=table.num_embeddings,
        pooling=embedding_configs.PoolingType.SUM,
        data_type=data_type,
    )


class LargeEmbeddings(nn.Module):
    """Pooled embeddings of one id feature per table.

    Args:
        config: the tables.
        device: where the weights live; the seed used `meta`, a server needs real memory. The weights are
            uninitialised: load a checkpoint or call `embeddings.weights.init_weights`.
    """

    def __init__(self, config: LargeEmbeddingsConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        unweighted = [_torchrec_table(t) for t in config.tables if not t.weighted]
        weighted = [_torchrec_table(t) for t in config.tables if t.weighted]
        device = torch.device(device)
        self.ebc = EmbeddingBagCollection(tables=unweighted, device=device) if unweighted else None
        self.weighted_ebc = (
            EmbeddingBagCollection(tables=weighted, is_weighted=True, device=device) if weighted else None
        )
        self._num_unweighted = len(unweighted)
        if self.weighted_ebc is not None:
            for bag in self.weighted_ebc.embedding_bags.values():
                if bag.weight.dtype != torch.float32:
                    bag.register_forward_pre_hook(_weights_in_table_dtype, with_kwargs=True)
        logger.info(
            "LargeEmbeddings: %d tables on %s: %s",
            len(config.tables),
            device,
            ", ".join(f"{t.name}[{t.num_embeddings}x{t.embedding_dim} {t.data_type.value}]" for t in config.tables),
        )
        self.surgery_cut_point = torch.nn.Identity()

    def forward(self, sparse_features: KeyedJaggedTensor) -> KeyedTensor:
        """Pools every bag; `sparse_features` holds every key in `canonical_keys` order."""
        if self.weighted_ebc is None:
            assert self.ebc is not None
            pooled = self.ebc(sparse_features)
        elif self.ebc is None:
            pooled = self.weighted_ebc(sparse_features)
        else:
            n_weighted = len(sparse_features.keys()) - self._num_unweighted
            plain, weighted = sparse_features.split([self._num_unweighted, n_weighted])
            pooled = _concat_keyed(self.ebc(plain), self.weighted_ebc(weighted))
        return self.surgery_cut_point(pooled)


def _weights_in_table_dtype(
    bag: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
) -> tuple[tuple[object, ...], dict[str, object]]:
    """Casts a weighted fp16 table's per-id weights (float32 on the wire) to the table's type, which
    `torch.embedding_bag` requires; the pooled sum is then in the table's type, as for its unweighted bags."""
    weights, table = kwargs.get("per_sample_weights"), bag.weight
    if isinstance(weights, torch.Tensor) and isinstance(table, torch.Tensor) and weights.dtype != table.dtype:
        kwargs = {**kwargs, "per_sample_weights": weights.to(table.dtype)}
    return args, kwargs


def _concat_keyed(a: KeyedTensor, b: KeyedTensor) -> KeyedTensor:
    values = torch.cat([a.values(), b.values()], dim=1)  # promotes fp16 + fp32 to fp32
    return KeyedTensor(
        keys=a.keys() + b.keys(),
        length_per_key=a.length_per_key() + b.length_per_key(),
        values=values,
    )
