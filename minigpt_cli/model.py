"""The reference mini-GPT as a KerasHub ``Backbone`` + ``CausalLM`` + preprocessor.

The layers are the reference's: ``TokenAndPositionEmbedding``, ``num_layers``
post-norm ``TransformerDecoder`` blocks and a ``Dense`` head to the
vocabulary. As a KerasHub ``CausalLM`` it gets ``generate()`` with every
KerasHub sampler, run as one compiled loop over a key/value cache.

>>> backbone = MiniGPTBackbone(vocabulary_size=5000, sequence_length=128,
...     embedding_dim=256, intermediate_dim=128, num_heads=3, num_layers=2)
>>> MiniGPTCausalLM(backbone).count_params()
3255938
"""

from __future__ import annotations

from pathlib import Path

import keras
import keras_hub
import numpy as np
from keras import ops

# Keras's own helper for the replica scaling of a loss under tf.distribute (no public alias).
from keras.src.losses.loss import unscale_loss_for_distribution

from minigpt_cli.errors import MinigptError
from minigpt_cli.vocab import MiniGPTTokenizer


@keras.saving.register_keras_serializable(package="minigpt")
class MiniGPTBackbone(keras_hub.models.Backbone):
    """Token + position embedding and a stack of causal ``TransformerDecoder``s.

    Takes ``{"token_ids", "padding_mask"}`` and returns the hidden states
    ``(batch, length, embedding_dim)``.
    """

    def __init__(
        self,
        vocabulary_size: int,
        sequence_length: int,
        embedding_dim: int,
        intermediate_dim: int,
        num_heads: int,
        num_layers: int,
        dropout: float = 0.0,
        dtype=None,
        **kwargs,
    ):
        # === Layers ===
        self.embedding = keras_hub.layers.TokenAndPositionEmbedding(
            vocabulary_size=vocabulary_size,
            sequence_length=sequence_length,
            embedding_dim=embedding_dim,
            dtype=dtype,
            name="token_and_position_embedding",
        )
        self.transformer_layers = [
            keras_hub.layers.TransformerDecoder(
                intermediate_dim=intermediate_dim,
                num_heads=num_heads,
                dropout=dropout,
                dtype=dtype,
                name=f"transformer_decoder_{i}",
            )
            for i in range(num_layers)
        ]

        # === Functional Model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self.embedding(token_ids)
        for layer in self.transformer_layers:
            x = layer(x, decoder_padding_mask=padding_mask)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=x,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.sequence_length = sequence_length
        self.embedding_dim = embedding_dim
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.dropout = dropout

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "sequence_length": self.sequence_length,
                "embedding_dim": self.embedding_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_heads": self.num_heads,
                "num_layers": self.num_layers,
                "dropout": self.dropout,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="minigpt")
class MiniGPTCausalLMPreprocessor(keras_hub.models.CausalLMPreprocessor):
    """Packs text the reference's way: features ``[BOS] + tokens``, labels ``tokens``.

    ``sample_weight`` masks the padded labels.
    """

    tokenizer_cls = MiniGPTTokenizer

    def __init__(self, tokenizer, sequence_length: int = 128, **kwargs):
        kwargs.setdefault("add_end_token", False)
        super().__init__(tokenizer=tokenizer, sequence_length=sequence_length, **kwargs)


@keras.saving.register_keras_serializable(package="minigpt")
class MiniGPTCausalLM(keras_hub.models.CausalLM):
    """The mini-GPT language model: backbone + ``Dense`` head, with cached generation."""

    backbone_cls = MiniGPTBackbone
    preprocessor_cls = MiniGPTCausalLMPreprocessor

    def __init__(self, backbone: MiniGPTBackbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        # Under a mixed precision policy the logits stay float32, for a stable loss.
        mixed = backbone.dtype_policy.name.startswith("mixed")
        head_dtype = "float32" if mixed else backbone.dtype_policy
        self.lm_head = keras.layers.Dense(backbone.vocabulary_size, dtype=head_dtype, name="lm_head")

        # === Functional Model ===
        inputs = backbone.input
        outputs = self.lm_head(backbone(inputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def compile(self, *args, **kwargs):
        """``CausalLM.compile``, plus ``token_loss``: the loss averaged over the epoch's real tokens."""
        super().compile(*args, **kwargs)
        if getattr(self, "token_loss", None) is None:  # compiled again (a resume): keep the ones Keras tracks
            self.token_loss = keras.metrics.Mean(name="token_loss")
            self.batch_loss = keras.metrics.Mean(name="batch_loss")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The batch's loss, the mean over its real (unmasked) tokens; also accumulated per token.

        Keras averages its own ``loss`` log over batches; ``token_loss`` weighs
        each batch by its real tokens, so the epoch's figure is the mean over
        every real token, as perplexity is. ``batch_loss`` holds the last
        training batch's own loss.
        """
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if getattr(self, "token_loss", None) is not None and loss is not None:
            tokens = ops.sum(sample_weight) if sample_weight is not None else ops.cast(ops.size(y), "float32")
            loss_value = unscale_loss_for_distribution(loss)
            self.token_loss.update_state(loss_value, sample_weight=tokens)
            if training:
                self.batch_loss.reset_state()
                self.batch_loss.update_state(loss_value, sample_weight=tokens)
        return loss

    def get_metrics_result(self):
        """Metrics as Keras logs them, with ``loss`` the mean over real tokens (``token_loss``)."""
        result = super().get_metrics_result()
        if "token_loss" in result:
            result["loss"] = result.pop("token_loss")
        return result

    def compile_from_config(self, config):
        """Restore optimizer (with its state), loss and metrics when a checkpoint is loaded.

        Keras skips this for models whose ``compile()`` is overridden, as
        ``CausalLM``'s is; its arguments are a superset of Keras's, so the
        saved config applies as it is.
        """
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def fit(self, *args, **kwargs):
        """Keras' own ``fit`` on JAX and PyTorch: KerasHub's would turn the NumPy batches into ``tf.data``."""
        if keras.config.backend() != "tensorflow" and self.preprocessor is None:
            return keras.Model.fit(self, *args, **kwargs)
        return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        """Keras' own ``evaluate`` on JAX and PyTorch (see ``fit``)."""
        if keras.config.backend() != "tensorflow" and self.preprocessor is None:
            return keras.Model.evaluate(self, *args, **kwargs)
        return super().evaluate(*args, **kwargs)

    #: Set when training under ``MultiWorkerMirroredStrategy``; see ``_worker_logs``.
    multi_worker_logs = False

    def train_step(self, *args, **kwargs):
        return _edit_logs(super().train_step(*args, **kwargs), self._worker_logs)

    def test_step(self, *args, **kwargs):
        def edit(logs):
            logs = dict(logs)
            logs.pop("batch_loss", None)  # a training figure
            return self._worker_logs(logs)

        return _edit_logs(super().test_step(*args, **kwargs), edit)

    def _worker_logs(self, logs):
        # Keras 3 averages the replicas' logs across workers with reduce(axis=0), which fails on
        # scalars (tensorflow/tensorflow#72388); with a leading axis of 1 that reduce is the mean.
        if not self.multi_worker_logs:
            return logs
        return {name: ops.expand_dims(value, 0) for name, value in logs.items()}

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Build metrics and optimizer under a strategy from a batch of the right shape.

        Keras pulls a batch from the distributed iterator and reduces it across
        replicas, which ``MultiWorkerMirroredStrategy`` cannot do for a dict of
        inputs (and which spends a training batch); any batch of the right
        structure builds the same variables.
        """
        if iterator is None or self._distribute_strategy is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        length = self.backbone.sequence_length
        ids = np.zeros((1, length), dtype="int32")
        batch = ({"token_ids": ids, "padding_mask": np.ones_like(ids)}, ids, np.ones((1, length), dtype="float32"))
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=batch)

    def call_with_cache(self, token_ids, cache, cache_update_index, key_mask=None):
        """One forward pass over ``token_ids`` placed at ``cache_update_index``.

        ``cache`` holds every layer's keys and values, flattened per sequence
        to ``(batch, layers * 2 * length * heads * head_dim)``: beam search
        reorders it every step, and on one flat axis that is a plain row
        gather (2.3x cheaper under XLA than on the 6-d layout). ``key_mask``
        ``(batch, length)`` marks the positions that may be attended to, so
        ``[PAD]`` keys are masked as in the uncached model.
        Returns ``(logits, hidden_states, cache)``.
        """
        backbone = self.backbone
        batch_size = ops.shape(token_ids)[0]
        head_dim = backbone.embedding_dim // backbone.num_heads
        cache = ops.reshape(cache, [batch_size, backbone.num_layers, 2, -1, backbone.num_heads, head_dim])
        x = backbone.embedding(token_ids, start_index=cache_update_index)
        attention_mask = None if key_mask is None else ops.expand_dims(ops.cast(key_mask, "int32"), axis=1)
        caches = []
        for i, layer in enumerate(backbone.transformer_layers):
            x, layer_cache = layer(
                x,
                decoder_attention_mask=attention_mask,
                self_attention_cache=cache[:, i, ...],
                self_attention_cache_update_index=cache_update_index,
            )
            caches.append(layer_cache)
        return self.lm_head(x), x, ops.reshape(ops.stack(caches, axis=1), [batch_size, -1])

    def _build_cache(self, token_ids):
        backbone = self.backbone
        batch_size, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        head_dim = backbone.embedding_dim // backbone.num_heads
        size = backbone.num_layers * 2 * length * backbone.num_heads * head_dim
        cache = ops.zeros([batch_size, size], dtype=self.compute_dtype)
        key_mask = ops.not_equal(token_ids, 0)
        _, hidden_states, cache = self.call_with_cache(token_ids, cache, 0, key_mask)
        return hidden_states, cache

    #: Set by ``Generator`` to apply decoding controls: ``process(logits, tokens, index) -> logits``.
    logits_processor = None

    def next_logits(self, tokens, cache, index, process=None):
        """The logits for position ``index`` of ``tokens``, from the cache and the token before it.

        ``process(logits, tokens, index)`` reshapes them (decoding controls).
        Returns ``(logits, hidden_state, cache)`` as KerasHub samplers' ``next`` does.
        """
        cache_update_index = index - 1
        batch_size = ops.shape(tokens)[0]
        key_mask = ops.not_equal(tokens, 0)
        token = ops.slice(tokens, [0, cache_update_index], [batch_size, 1])
        logits, hidden, cache = self.call_with_cache(token, cache, cache_update_index, key_mask)
        logits = ops.squeeze(logits, axis=1)
        if process is not None:
            logits = process(logits, tokens, index)
        return logits, ops.squeeze(hidden, axis=1), cache

    def generate_step(self, inputs, stop_token_ids=None):
        """Fill every position past each prompt with sampled tokens (XLA-compilable)."""
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        if stop_token_ids is not None:
            # generate()'s default "auto" asks to stop at the end token, and our tokenizer has none.
            stop_token_ids = [t for t in stop_token_ids if t is not None] or None
        hidden_states, cache = self._build_cache(token_ids)
        index = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))
        token_ids = self.sampler(
            next=lambda tokens, cache, index: self.next_logits(tokens, cache, index, self.logits_processor),
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
        return {"token_ids": token_ids, "padding_mask": ops.ones_like(token_ids, dtype="bool")}


def _edit_logs(result, edit):
    """Apply ``edit`` to a step's logs: JAX's stateless steps return ``(logs, state)``, the others the logs."""
    if isinstance(result, tuple):
        logs, state = result
        return edit(logs), state
    return edit(result)


def build_model(vocabulary_size: int, cfg) -> MiniGPTCausalLM:
    """A fresh mini-GPT sized by a ``ModelConfig`` and the vocabulary's real size."""
    backbone = MiniGPTBackbone(
        vocabulary_size=vocabulary_size,
        sequence_length=cfg.seq_len,
        embedding_dim=cfg.embed_dim,
        intermediate_dim=cfg.feed_forward_dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        dropout=cfg.dropout,
    )
    return MiniGPTCausalLM(backbone)


def load_model(path: Path, vocab_size: int, *, compile: bool = False) -> MiniGPTCausalLM:
    """Load a ``model.keras`` or checkpoint and check that it matches the vocabulary.

    ``compile=False`` loads the weights for use (generate, evaluate);
    ``compile=True`` also restores the optimizer and its state, to resume.
    """
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras warns that optimizer state is skipped without compile
            model = keras.saving.load_model(path, compile=compile)
    except Exception as e:  # a corrupt zip, a foreign file, a missing class...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinigptError(f"cannot load {path} ({first[:200]}); train again with 'minigpt train'") from None
    if not isinstance(model, MiniGPTCausalLM):
        raise MinigptError(f"{path} is not a minigpt model; train one with 'minigpt train'")
    if model.backbone.vocabulary_size != vocab_size:
        raise MinigptError(
            f"the model in {path} was trained with {model.backbone.vocabulary_size} tokens but vocab.txt "
            f"has {vocab_size}; run 'minigpt train' again after 'minigpt vocab'"
        )
    return model
