"""The phases of one evaluation, one function per `Phase`, each run on one chunk of images.

A phase reads the chunk (and what earlier phases left on it: the natural predictions, the
vote's defended labels), runs its attack through `evaluator.attacks`, writes its per-image
fields into the run's record and charges its forward passes to its name. `PHASE_STEPS` maps
each `Phase` to its function; `evaluator.evaluate.evaluate` calls them in `Phase` order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from evaluator.ablations import Ablation, ablation_variant
from evaluator.attacks import (
    STREAM_VOTE_NATURAL,
    STREAM_WORST_OF_K,
    VoteProtocol,
    draw_pair_predictor,
    fixed_vote_draws,
    fixed_vote_pair_predictor,
    grid_pair_predictor,
    grid_vote_pair_predictor,
    undefended_worst_points,
    vote_predict,
    vote_with_draws,
)
from evaluator.errors import ModelFormatError, ModelNotDifferentiableError, ModelOutputError
from evaluator.first_order import first_order_attack
from evaluator.options import PROTOCOL_PHASES, Metric, Phase
from evaluator.run_state import Chunk, Run
from evaluator.search import search_candidates
from evaluator.transforms import spatial_transform, uniform_transforms
from evaluator.vocabulary import ablation_fields

__all__ = ["PHASE_STEPS"]


def _natural_phase(run: Run, chunk: Chunk) -> None:
    with run.counting(Phase.NATURAL):
        natural_pred = run.classifier.logits(chunk.images).argmax(dim=1)
    chunk.natural_pred = natural_pred
    chunk.natural_correct = natural_pred == chunk.labels
    run.record["label"][chunk.rows] = chunk.labels.cpu()
    run.record["natural_pred"][chunk.rows] = natural_pred.cpu()


def _worst_of_k_phase(run: Run, chunk: Chunk) -> None:
    s, grid, device = run.settings, run.benchmark.grid, chunk.images.device
    k = run.benchmark.worst_of_k if Metric.WORST_OF_K in s.metrics else 1
    with run.counting(Phase.WORST_OF_K):
        draws = uniform_transforms(grid.box, s.seed, STREAM_WORST_OF_K, chunk.ids, k).to(device)
        outcome = search_candidates(
            draw_pair_predictor(run.classifier, chunk.images, draws, run.benchmark.fill),
            chunk.labels,
            k,
            pairs_per_batch=run.classifier.batch_size,
            exhaustive=None if run.options.early_exit else torch.ones(chunk.size, dtype=torch.bool),
            on_batch=run.tracker.reporter(Phase.WORST_OF_K, chunk.size),
        )
    # Draw 0 is tried first for every image, so it is the random attack's draw.
    run.record["random_correct"][chunk.rows] = outcome.correct[:, 0].long().cpu()
    if Metric.WORST_OF_K in s.metrics:
        run.record["worst_of_k_correct"][chunk.rows] = outcome.robust.long().cpu()


def _identity_known(run: Run, chunk: Chunk) -> tuple[int, Tensor, Tensor] | None:
    identity = run.benchmark.grid.identity_index()
    if identity is None or chunk.natural_correct is None or chunk.natural_pred is None:
        return None
    return identity, chunk.natural_correct, chunk.natural_pred


def _grid_phase(run: Run, chunk: Chunk) -> None:
    grid, device = run.benchmark.grid, chunk.images.device
    subset = run.settings.landscape_subset
    if not run.options.early_exit or subset is None:
        in_landscape = torch.ones(chunk.size, dtype=torch.bool, device=device)
    else:
        in_landscape = (chunk.positions < subset).to(device)
    with run.counting(Phase.GRID):
        outcome = search_candidates(
            grid_pair_predictor(run.classifier, chunk.images, grid.points(), run.benchmark.fill),
            chunk.labels,
            grid.size,
            pairs_per_batch=run.classifier.batch_size,
            order=run.grid_order,
            exhaustive=in_landscape,
            known=_identity_known(run, chunk),
            on_batch=run.tracker.reporter(Phase.GRID, chunk.size),
        )
    rows = chunk.rows
    run.record["grid_robust"][rows] = outcome.robust.long().cpu()
    run.record["grid_fool_point"][rows] = outcome.first_fool.cpu()
    run.record["grid_fool_pred"][rows] = outcome.fool_prediction.cpu()
    fool_counts = (~outcome.correct).sum(dim=1)
    run.record["grid_fool_count"][rows] = torch.where(in_landscape, fool_counts, -1).cpu()
    run.landscape_correct += outcome.correct[in_landscape].sum(dim=0).cpu()
    run.landscape_images += int(in_landscape.sum())


def _vote_batch(run: Run) -> int:
    """Images per batch for the vote: each costs ``vote_samples`` forward passes."""
    return max(1, run.classifier.batch_size // run.benchmark.vote_samples)


def _vote_natural_phase(run: Run, chunk: Chunk) -> None:
    """The defended model on the untransformed images of the vote subset."""
    local = chunk.in_subset(run.settings.vote_subset)
    images, ids = chunk.images[local], chunk.ids[local.cpu()].to(chunk.images.device)
    per_batch = _vote_batch(run)
    with run.counting(Phase.VOTE):
        defended = [
            vote_predict(
                run.classifier,
                images[s : s + per_batch],
                ids[s : s + per_batch],
                0,
                box=run.benchmark.grid.box,
                seed=run.settings.seed,
                stream=STREAM_VOTE_NATURAL,
                samples=run.benchmark.vote_samples,
                fill=run.benchmark.fill,
            )
            for s in range(0, images.shape[0], per_batch)
        ]
    chunk.vote_local = local
    chunk.vote_pred = torch.cat(defended) if defended else chunk.labels[local]
    chunk.vote_correct = chunk.vote_pred == chunk.labels[local]
    run.write("vote_natural_correct", chunk, local, chunk.vote_correct)


def _grid_vote_search(run: Run, chunk: Chunk, protocol: VoteProtocol) -> Tensor | None:
    """Whether each image of the vote subset survives a search over all grid points against
    the defended prediction under ``protocol`` (adaptive or per-query); None when the chunk
    has no image in the subset."""
    b, s = run.benchmark, run.settings
    local = chunk.vote_local
    if local is None or local.numel() == 0:
        return None
    images, labels = chunk.images[local], chunk.labels[local]
    ids = chunk.ids[local.cpu()]
    phase = PROTOCOL_PHASES[protocol]
    known = None
    if protocol is VoteProtocol.ADAPTIVE:
        draws = fixed_vote_draws(b.grid.box, ids, seed=s.seed, samples=b.vote_samples)
        predict = fixed_vote_pair_predictor(run.classifier, images, draws, b.grid.points(), b.fill)
        # At the identity the fixed draws give exactly the vote's natural pass.
        identity = b.grid.identity_index()
        if identity is not None and chunk.vote_correct is not None:
            assert chunk.vote_pred is not None
            known = (identity, chunk.vote_correct, chunk.vote_pred)
    else:
        predict = grid_vote_pair_predictor(
            run.classifier, images, ids, b.grid, seed=s.seed, samples=b.vote_samples, fill=b.fill
        )
    exhaustive = None if run.options.early_exit else torch.ones(len(labels), dtype=torch.bool)
    with run.counting(phase):
        outcome = search_candidates(
            predict,
            labels,
            b.grid.size,
            pairs_per_batch=_vote_batch(run),
            order=run.vote_orders[protocol],
            exhaustive=exhaustive,
            known=known,
            on_batch=run.tracker.reporter(phase, len(labels)),
        )
    return outcome.robust


def _grid_vote_adaptive_phase(run: Run, chunk: Chunk) -> None:
    robust = _grid_vote_search(run, chunk, VoteProtocol.ADAPTIVE)
    if robust is not None and chunk.vote_local is not None:
        run.write("grid_vote_robust", chunk, chunk.vote_local, robust)


def _grid_vote_per_query_phase(run: Run, chunk: Chunk) -> None:
    robust = _grid_vote_search(run, chunk, VoteProtocol.PER_QUERY)
    if robust is not None and chunk.vote_local is not None:
        run.write("grid_vote_per_query_robust", chunk, chunk.vote_local, robust)


def _grid_vote_transfer_phase(run: Run, chunk: Chunk) -> None:
    """Grid + vote under the ``transfer`` attacker: the undefended model's worst grid point,
    then the vote with the image's fixed draws, once."""
    b, s = run.benchmark, run.settings
    local = chunk.vote_local
    if local is None or local.numel() == 0:
        return
    images, labels = chunk.images[local], chunk.labels[local]
    ids = chunk.ids[local.cpu()]
    points = b.grid.points().to(images.device)
    draws = fixed_vote_draws(b.grid.box, ids, seed=s.seed, samples=b.vote_samples)
    draws = draws.to(images.device)
    per_batch = _vote_batch(run)
    with run.counting(Phase.GRID_VOTE_TRANSFER):
        worst = undefended_worst_points(run.classifier, images, labels, points, b.fill)
        attacked = spatial_transform(images, points[worst], b.fill)
        defended = torch.cat(
            [
                vote_with_draws(
                    run.classifier, attacked[i : i + per_batch], draws[i : i + per_batch], b.fill
                )
                for i in range(0, len(labels), per_batch)
            ]
        )
    run.write("grid_vote_transfer_correct", chunk, local, defended == labels)
    run.write("grid_vote_transfer_point", chunk, local, worst)


def _first_order_phase(run: Run, chunk: Chunk) -> None:
    config = run.settings.first_order
    local = chunk.in_subset(run.settings.first_order_subset)
    if config is None or local.numel() == 0 or run.first_order_error is not None:
        return
    assert chunk.natural_correct is not None
    images, labels = chunk.images[local], chunk.labels[local]
    report = run.tracker.report
    try:
        with run.counting(Phase.FIRST_ORDER):
            outcome = first_order_attack(
                run.classifier,
                images,
                labels,
                chunk.ids[local.cpu()],
                run.benchmark.grid.box,
                seed=run.settings.seed,
                fill=run.benchmark.fill,
                config=config,
                on_batch=lambda done: report(Phase.FIRST_ORDER, done / len(labels)),
            )
    except ModelNotDifferentiableError as exc:
        run.first_order_error = str(exc)
        return
    # An image the model gets wrong untransformed is fooled by the identity, which is inside
    # the box: first-order accuracy can never exceed natural accuracy.
    correct = outcome.correct & chunk.natural_correct[local]
    run.write("first_order_correct", chunk, local, correct)


def _ablation_phase(run: Run, chunk: Chunk) -> None:
    local = chunk.in_subset(run.settings.ablation_subset)
    if local.numel() == 0:
        return
    for ablation in run.settings.ablations:
        if ablation not in run.ablation_errors:
            _ablation_search(run, chunk, local, ablation)


def _ablation_search(run: Run, chunk: Chunk, local: Tensor, ablation: Ablation) -> None:
    """One ablation's grid attack on the chunk's images at ``local``."""
    b = run.benchmark
    assert chunk.natural_correct is not None and chunk.natural_pred is not None
    variant = ablation_variant(ablation, b.grid, b.fill)
    robust_field, natural_field = ablation_fields(ablation)
    if variant.same_as(b.grid, b.fill) and Metric.GRID in run.settings.metrics:
        # The benchmark's own grid attack, already measured on these images.
        run.write(robust_field, chunk, local, run.record["grid_robust"][chunk.rows][local.cpu()])
        run.write(natural_field, chunk, local, chunk.natural_correct[local])
        return
    images, labels = variant.prepare(chunk.images[local]), chunk.labels[local]
    identity = variant.grid.identity_index()
    known = None
    if variant.canvas == 1 and identity is not None:
        known = (identity, chunk.natural_correct[local], chunk.natural_pred[local])
    before = run.classifier.forward_passes
    try:
        with run.counting(Phase.ABLATIONS):
            outcome = search_candidates(
                grid_pair_predictor(run.classifier, images, variant.grid.points(), variant.fill),
                labels,
                variant.grid.size,
                pairs_per_batch=run.classifier.batch_size,
                order=run.ablation_orders[ablation],
                exhaustive=None
                if run.options.early_exit
                else torch.ones(len(labels), dtype=torch.bool),
                known=known,
            )
    except (ModelOutputError, ModelFormatError, RuntimeError) as exc:
        if variant.canvas == 1:
            raise
        # A model built for one input size may refuse the canvas; that is a property of the
        # model to report, not a failed evaluation.
        h, w = images.shape[-2:]
        run.ablation_errors[ablation] = f"the model does not accept {h}x{w} canvas images: {exc}"
        return
    finally:
        run.ablation_passes[ablation] += run.classifier.forward_passes - before
    run.write(robust_field, chunk, local, outcome.robust)
    if identity is not None:
        run.write(natural_field, chunk, local, outcome.correct[:, identity])


PHASE_STEPS: dict[Phase, Callable[[Run, Chunk], None]] = {
    Phase.NATURAL: _natural_phase,
    Phase.WORST_OF_K: _worst_of_k_phase,
    Phase.GRID: _grid_phase,
    Phase.VOTE: _vote_natural_phase,
    Phase.GRID_VOTE: _grid_vote_adaptive_phase,
    Phase.GRID_VOTE_PER_QUERY: _grid_vote_per_query_phase,
    Phase.GRID_VOTE_TRANSFER: _grid_vote_transfer_phase,
    Phase.FIRST_ORDER: _first_order_phase,
    Phase.ABLATIONS: _ablation_phase,
}
