"""Run model chunks over micro-batches through megatron-core's pipeline schedules.

One job: adapt "a list of micro-batch dicts" to megatron-core's ``forward_step`` contract, so that
the teacher's targets and the trainer's forward/backward move data through pipeline stages the same
way (``get_forward_backward_func`` picks no-pipelining, 1F1B or interleaved). Non-goals: losses;
decoding, whose short rounds of changing shapes pass the stages explicitly (``rollout/stages.py``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_opdlm.runtime.context import ParallelContext

Batch = dict[str, torch.Tensor]


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The three tensors the decoder takes, from a batch dict."""
    return dict(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=batch["meta"],
    )


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a chunk's parameters live (CPU for a chunk without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch with every tensor on ``device`` (no copy for tensors already there).

    Rows built from dataset responses or prompts (``sft``, ``ar``, off-policy data, lazy teacher
    inputs) are CPU tensors; on a GPU the model and the loss need them on the GPU.
    """
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_schedule(
    chunks: Sequence[torch.nn.Module],
    microbatches: Sequence[Batch],
    loss_fn: Callable[[torch.Tensor, Batch], tuple],
    *,
    forward_only: bool,
    logits_last: Optional[int] = None,
    logits_columns: Optional[torch.Tensor] = None,
    model_kwargs: Optional[Callable[[Batch], dict[str, Any]]] = None,
    seq_length: Optional[int] = None,
) -> list[Any]:
    """Forward (and backward unless ``forward_only``) over ``microbatches``.

    ``loss_fn(output, batch)`` runs on the last stage and returns what megatron-core's loss_func
    returns: ``(loss, num_tokens, reported)`` or ``(loss, reported)``. Returns the list of
    ``reported`` values on the last pipeline stage (empty elsewhere). ``logits_last``: the last
    stage computes logits for the last this-many columns only, ``logits_columns`` for these columns
    (``DiffusionGPTModel.forward``); a micro-batch's own ``logits_columns`` entry (packed rows,
    ``distill/packing.py``) wins over the argument. ``model_kwargs(batch)``: more keyword arguments for the chunks'
    forward (a streamed teacher's inputs); ``seq_length``: the length of the tensors the stages send
    each other, when it is not the rows' (a streamed teacher packs its hidden states behind them).
    """
    if not microbatches:
        return []
    seq_len = seq_length or microbatches[0]["input_ids"].shape[1]
    mbs = microbatches[0]["input_ids"].shape[0]
    iterators: list[Iterator[Batch]] = [iter(microbatches) for _ in chunks]

    def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
        batch = to_device(next(data_iterator), model_device(model))
        extra = model_kwargs(batch) if model_kwargs is not None else {}
        last, columns = logits_last, logits_columns
        if "logits_columns" in batch:  # packed rows carry their own
            last, columns = None, batch["logits_columns"]
        output = model(**model_inputs(batch), logits_last=last, logits_columns=columns, **extra)
        return output, lambda out: loss_fn(out, batch)

    return schedule_for(chunks[0])(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=list(chunks),
        num_microbatches=len(microbatches),
        seq_length=seq_len,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def _context_of(model: torch.nn.Module) -> Optional[ParallelContext]:
    """The ``ParallelContext`` a chunk was built with, through DDP / Float16Module wrappers."""
    while model is not None:
        ctx = getattr(model, "parallel", None)
        if isinstance(ctx, ParallelContext):
            return ctx
        model = getattr(model, "module", None)
    return None


def schedule_for(chunk: torch.nn.Module) -> Callable[..., list[Any]]:
    """megatron-core's forward/backward function for the layout ``chunk`` was built at.

    Chunks on megatron-core's own groups (the student's) get ``get_forward_backward_func()`` as is;
    chunks on groups of their own (``ParallelContext.own_groups``: a teacher with its own layout)
    get it for their pipeline size, handed their pipeline communicator and process groups."""
    ctx = _context_of(chunk)
    if ctx is None or not ctx.own_groups:
        return get_forward_backward_func()
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    run = get_forward_backward_func(pp_size=ctx.pp_size, vp_size=ctx.vpp_size)
    p2p = P2PCommunicator(pp_group=ctx.pgs.pp, config=unwrap_config(chunk))
    return functools.partial(run, p2p_communicator=p2p, pg_collection=ctx.pgs)


def unwrap_config(chunk: torch.nn.Module):
    """The chunk's megatron-core ``TransformerConfig`` (what its pipeline communicator is told)."""
    while not hasattr(chunk, "config") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk.config


def forward_collect(
    chunks: Sequence[torch.nn.Module],
    microbatches: Sequence[Batch],
    collect: Callable[[torch.Tensor, Batch], Any],
    logits_last: Optional[int] = None,
) -> list[Any]:
    """Forward-only: ``collect(last_stage_output, batch)`` per micro-batch, on the last stage."""

    def loss_fn(output: torch.Tensor, batch: Batch) -> tuple:
        return output.new_zeros(()), collect(output, batch)

    with torch.no_grad():
        return run_schedule(chunks, microbatches, loss_fn, forward_only=True, logits_last=logits_last)
