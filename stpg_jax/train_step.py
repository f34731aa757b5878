"""One training step (DESIGN.md §2 and §3) as named functions, in the method's order, and one function per mode
composing them: `stpg_step`, `mean_teacher_step`, `supervised_step`.

``train_step(recipe, state, batch, assignment) -> (state, metrics)`` is what ``stpg_jax.build`` jits, with the
`Recipe` static (the step reads the config's fields from it; equal recipes share one compiled step). The batch
holds uint8 images as loaded, each view with the box of its own pixels inside the crop, and int32 labels:
``image (Bl,S,S,3)``, ``label (Bl,S,S)``, ``unlabeled0``/``unlabeled1`` ``(Bu,S,S,3)``, ``<name>_box (B,4)``.
The networks normalise their input (``stpg_jax.models.inputs``).

A network that sees several inputs (a student: x_l then u_mix; a teacher: u0, u1, then x_l for the bank) sees them
joined in one pass. With ``model.bn_statistics=per_input`` each input is normalised by its own BatchNorm statistics
and the running averages move once per input, in that order, as the released code's separate passes (DESIGN.md
§8.1). Under a data-parallel mesh, inputs are joined device by device (``recipe.batch_groups``), so their images and
outputs stay on the device that loaded them; means, BatchNorm statistics and the pixel-selection confusion matrix
cover the global batch.

The STPG step's third argument is the assignment its contrastive losses use (``{'assignment': (C,) int32,
'matched': () bool}``). With ``stpg.assignment_timing=same_step`` (the release, DESIGN.md §8.3) that is the matching
of the prototypes this very step updates, which the host computes from the step's output
(``stpg_jax.host_matching.SameStepMatching``); the bank's proximity ranking uses the assignment the state carries
from before. The output state carries the loss's assignment. Otherwise (or with None) the loss uses the state's.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from stpg_jax import losses, sharding
from stpg_jax.models.batchnorm import BEFORE_LAST_GROUP
from stpg_jax.models.inputs import box_mask
from stpg_jax.recipe import Recipe
from stpg_jax.state import ContrastState, Network, TrainState, ema


class View(NamedTuple):
    """A batch of uint8 images and the map of each one's own pixels (None: all of them)."""

    images: jax.Array
    valid: Optional[jax.Array]


class Targets(NamedTuple):
    """A teacher's pseudo-labels and confidences for the strong view, its outputs on x_l (for the bank, or None) and
    its BatchNorm running averages after its pass."""

    labels: jax.Array
    confidence: jax.Array
    on_labelled: Optional[dict]
    batch_stats: Any


def _per_input(r: Recipe) -> bool:
    return r.config.model.bn_statistics == "per_input"


def _ignore(r: Recipe) -> int:
    return r.config.data.ignore_index


# 1. Weak views (augmented on the host).
def weak_view(batch: dict, name: str) -> View:
    images, box = batch[name], batch.get(f"{name}_box")
    return View(images, None if box is None else box_mask(box, *images.shape[1:3]))


# 2. Strong view: CutMix of the two unlabelled batches (a select per pixel: the same values mixed before or after
# normalisation).
def strong_view(key, u0: View, u1: View):
    n, height, width = u0.images.shape[:3]
    mask = losses.cutmix_box_mask(key, n, height, width)
    valid = None if u0.valid is None else jnp.where(mask > 0, u1.valid, u0.valid)
    return mask, View(losses.mix(u0.images, u1.images, mask), valid)


def forward(r: Recipe, net: Network, params, views, key, before_last: bool = False):
    """The network on ``views`` joined in one pass: (outputs per view, BatchNorm running averages, the averages
    before the last view's update if ``before_last``, else None). train=True: batch statistics and dropout on, for
    students and teachers alike (as released)."""
    sizes = [v.images.shape[0] for v in views]
    model = r.model
    grouped = _per_input(r) and len(views) > 1
    if grouped:
        model = model.clone(bn_groups=sharding.group_ids(sizes, r.batch_groups))
    before_last = before_last and grouped
    images = sharding.concat_local([v.images for v in views], r.batch_groups)
    valid = None if views[0].valid is None else sharding.concat_local([v.valid for v in views], r.batch_groups)
    out, mutated = model.apply({"params": params, "batch_stats": net.batch_stats}, images, train=True, valid=valid,
                               rngs={"dropout": key},
                               mutable=["batch_stats"] + ([BEFORE_LAST_GROUP] if before_last else []))
    pieces = {k: sharding.split_local(v, sizes, r.batch_groups) for k, v in out.items()}
    outs = [{k: v[i] for k, v in pieces.items()} for i in range(len(views))]
    return outs, mutated["batch_stats"], mutated[BEFORE_LAST_GROUP] if before_last else None


# 3. Supervised loss (CE, or OHEM CE for Cityscapes).
def supervised_loss(r: Recipe, logits, labels):
    c = r.config.loss
    if c.supervised == "ohem":
        return losses.ohem_cross_entropy(logits, labels, threshold=c.ohem_threshold, min_kept=c.ohem_min_kept,
                                         class_weights=tuple(c.ohem_class_weights) or None, ignore_index=_ignore(r))
    return losses.cross_entropy(logits, labels, ignore_index=_ignore(r))


# 4. Teachers on the weak views; pseudo-labels from their mixed logits.
def teacher_targets(r: Recipe, teacher: Network, u0: View, u1: View, mask, key, step, x_l: Optional[View] = None):
    """With ``x_l`` (the bank's source teacher) the teacher also sees the labelled batch; with per-input statistics
    that pass counts in its running averages only from the bank's start (DESIGN.md §8.1)."""
    views = (u0, u1) if x_l is None else (u0, u1, x_l)
    outs, stats, before = forward(r, teacher, teacher.params, views, key, before_last=x_l is not None)
    if before is not None:
        stats = jax.tree_util.tree_map(lambda a, b: jnp.where(step >= r.phases.bank_start, a, b), stats, before)
    outs = jax.lax.stop_gradient(outs)
    labels, confidence = losses.pseudo_labels(outs[0]["logits"], outs[1]["logits"], mask)
    return Targets(labels, confidence, None if x_l is None else outs[2], stats)


# 5–7. Pixel selection for the Pro-Student (its own hard prediction against its teacher's labels), then the weighted
# CEs, normalised by all pixels.
def unsupervised_terms(r: Recipe, g_u, p_u, gen_target: Targets, pro_target: Targets):
    pi = jnp.argmax(jax.lax.stop_gradient(p_u), axis=-1)
    selection = losses.select_pixels(pro_target.labels, pi, r.num_classes, variant=r.config.stpg.selection)
    unsup_gen = losses.weighted_cross_entropy(g_u, gen_target.labels, gen_target.confidence, _ignore(r))
    unsup_pro = losses.weighted_cross_entropy(p_u, pro_target.labels, pro_target.confidence * selection["keep"],
                                              _ignore(r))
    return {"unsup_gen": unsup_gen, "unsup_pro": unsup_pro}, selection


# 8 (bank part). Prototypes, then the memory bank, from the source teacher's features on x_l (DESIGN.md §3 order).
def update_bank(r: Recipe, contrast: ContrastState, on_labelled: dict, y, step):
    """From the bank's start on; the bank's proximity ranking uses the assignment the state carries."""
    t = r.config.stpg
    assigned = contrast.assigned_anchors()
    feats = on_labelled["features"]
    h, w, dim = feats.shape[1:]
    y_small = losses.nearest_resize(y, (h, w))
    logits = jnp.moveaxis(losses.nearest_resize(jnp.moveaxis(on_labelled["logits"], -1, 1), (h, w)), 1, -1)
    probs = jax.nn.softmax(logits, axis=-1)
    candidates = losses.bank_candidates(probs, y_small, t.bank_confidence, _ignore(r)).reshape(-1)
    flat_feats, flat_labels = feats.reshape(-1, dim), y_small.reshape(-1)

    def update(c: ContrastState) -> ContrastState:
        prototypes = losses.update_prototypes(c.prototypes, flat_feats, flat_labels, candidates, t.prototype_momentum)
        bank = losses.update_memory_bank(c.bank, flat_feats, flat_labels, candidates, assigned,
                                         r.config.data.batch_labeled * t.bank_k, step >= r.phases.proximity_start)
        return c.replace(prototypes=prototypes, bank=bank)

    contrast = jax.lax.cond(step >= r.phases.bank_start, update, lambda c: c, contrast)
    metrics = {"bank_candidates": jnp.sum(candidates.astype(jnp.float32)),
               "bank_fill": jnp.mean(contrast.bank.count.astype(jnp.float32)) / contrast.bank.features.shape[1]}
    return contrast, metrics


def loss_contrast(r: Recipe, contrast: ContrastState, assignment: Optional[dict]) -> ContrastState:
    """The contrastive state whose assignment the losses use (see the module docstring)."""
    if r.config.stpg.assignment_timing == "same_step" and assignment is not None:
        return contrast.replace(assignment=assignment["assignment"], matched=assignment["matched"])
    return contrast


# 8. Dual contrastive learning on the Gen-Student's features at h×w: labelled pixels with their labels, unlabelled
# ones with the Pro-Teacher's pseudo-labels.
def contrastive_terms(r: Recipe, g_on_l: dict, g_on_u: dict, y, pseudo, anchors, bank: losses.MemoryBank, step):
    h, w, dim = g_on_l["features"].shape[1:]
    kw = dict(num_classes=r.num_classes, ignore_index=_ignore(r), temperature=r.config.stpg.contrastive_temperature)

    def term(features, labels):
        small = losses.nearest_resize(labels, (h, w)).reshape(-1)
        return losses.dual_contrastive_loss(features.reshape(-1, dim), small,
                                            anchors, bank.features, bank.count, **kw)

    lab, unl = term(g_on_l["features"], y), term(g_on_u["features"], pseudo)
    # Computed at every step and switched on by a select, not a lax.cond: a cond's outputs include the residuals its
    # gradient needs, which XLA's GPU partitioner gathers whole onto every device (1.1 GB per device per step for VOC
    # on 8 GPUs). Before the start the terms are finite and their gradient is zero.
    on = step >= r.phases.contrastive_start
    return {"con_labeled": jnp.where(on, lab, 0.0), "con_unlabeled": jnp.where(on, unl, 0.0)}


# 9. The total loss: L_s + λ_u·(L_g + L_p) + λ_c·(L_con(labelled) + L_con(unlabelled)), of the terms a mode has.
def total_loss(r: Recipe, terms: dict):
    def summed(*names):
        present = [terms[n] for n in names if n in terms]
        return sum(present[1:], present[0]) if present else None

    loss = summed("sup_gen", "sup_pro")
    unsup, con = summed("unsup_gen", "unsup_pro"), summed("con_labeled", "con_unlabeled")
    if unsup is not None:
        loss = loss + r.config.loss.unsup_weight * unsup
    if con is not None:
        loss = loss + r.config.loss.contrastive_weight * con
    return loss


# 9 (update). Separate SGD for each student.
def sgd_update(r: Recipe, net: Network, opt_state, grads, batch_stats):
    tx, _ = r.optimizer(net.params)
    updates, opt_state = tx.update(grads, opt_state, net.params)
    return Network(optax.apply_updates(net.params, updates), batch_stats), opt_state


# 10. Each teacher is the EMA of its own (updated) student.
def teacher_ema(r: Recipe, teacher: Network, targets: Targets, student: Network) -> Network:
    return ema(teacher.replace(batch_stats=targets.batch_stats), student, r.config.stpg.ema_decay)


def _keys(state: TrainState):
    """The step's keys: CutMix, Gen-Student, Pro-Student, Gen-Teacher, Pro-Teacher (dropout)."""
    return jax.random.split(jax.random.fold_in(state.rng, state.step), 5)


def _base_metrics(r: Recipe, state: TrainState) -> dict:
    _, schedule = r.optimizer(state.gen_student.params)
    return {"lr": schedule(state.step)}


def stpg_step(r: Recipe, state: TrainState, batch: dict, assignment: Optional[dict] = None):
    k_mix, k_gen, k_pro, k_tg, k_tp = _keys(state)
    t, step = r.config.stpg, state.step
    x_l, y = weak_view(batch, "image"), batch["label"].astype(jnp.int32)
    u0, u1 = weak_view(batch, "unlabeled0"), weak_view(batch, "unlabeled1")
    mask, u_mix = strong_view(k_mix, u0, u1)
    bank_source = t.bank_source if t.contrastive else None  # the teacher that also sees x_l, for the bank
    tg = teacher_targets(r, state.gen_teacher, u0, u1, mask, k_tg, step, x_l if bank_source == "gen_teacher" else None)
    tp = teacher_targets(r, state.pro_teacher, u0, u1, mask, k_tp, step, x_l if bank_source == "pro_teacher" else None)
    # Cross supervision: the Pro-Student learns from the Gen-Teacher and the Gen-Student from the Pro-Teacher.
    gen_target, pro_target = (tp, tg) if t.cross_supervision else (tg, tp)
    metrics = {**_base_metrics(r, state), "confidence_gen": jnp.mean(tg.confidence),
               "confidence_pro": jnp.mean(tp.confidence)}

    contrast = state.contrast
    used = loss_contrast(r, contrast, assignment)
    anchors = used.assigned_anchors()
    if t.contrastive:
        contrast, bank_metrics = update_bank(r, contrast, (tg if bank_source == "gen_teacher" else tp).on_labelled,
                                             y, step)
        metrics.update(bank_metrics)

    def loss_fn(params):
        # 3 + 5. Students on [x_l, u_mix] in one pass each.
        (g_l, g_u), g_stats, _ = forward(r, state.gen_student, params[0], (x_l, u_mix), k_gen)
        (p_l, p_u), p_stats, _ = forward(r, state.pro_student, params[1], (x_l, u_mix), k_pro)
        terms = {"sup_gen": supervised_loss(r, g_l["logits"], y), "sup_pro": supervised_loss(r, p_l["logits"], y)}
        unsup, selection = unsupervised_terms(r, g_u["logits"], p_u["logits"], gen_target, pro_target)
        terms.update(unsup)
        if t.contrastive:
            terms.update(contrastive_terms(r, g_l, g_u, y, tp.labels, anchors, contrast.bank, step))
        terms["loss"] = total_loss(r, terms)
        return terms["loss"], (g_stats, p_stats, selection, terms)

    params = (state.gen_student.params, state.pro_student.params)
    (_, (g_stats, p_stats, selection, terms)), (g_grads, p_grads) = jax.value_and_grad(loss_fn, has_aux=True)(params)
    gen, gen_opt = sgd_update(r, state.gen_student, state.gen_opt_state, g_grads, g_stats)
    pro, pro_opt = sgd_update(r, state.pro_student, state.pro_opt_state, p_grads, p_stats)
    metrics.update(terms, kept=jnp.mean(selection["keep"]), consistent=jnp.mean(selection["consistent"]),
                   highly_mismatched=jnp.mean(selection["high"]), mismatch_scores=selection["scores"])
    return state.replace(
        step=step + 1, gen_student=gen, gen_opt_state=gen_opt, pro_student=pro, pro_opt_state=pro_opt,
        gen_teacher=teacher_ema(r, state.gen_teacher, tg, gen), pro_teacher=teacher_ema(r, state.pro_teacher, tp, pro),
        contrast=contrast.replace(assignment=used.assignment, matched=used.matched),
    ), metrics


def mean_teacher_step(r: Recipe, state: TrainState, batch: dict, assignment: Optional[dict] = None):
    """The Gen-Student and its EMA teacher alone: supervised loss plus the weighted CE to its own teacher's labels."""
    k_mix, k_gen, _, k_tg, _ = _keys(state)
    x_l, y = weak_view(batch, "image"), batch["label"].astype(jnp.int32)
    u0, u1 = weak_view(batch, "unlabeled0"), weak_view(batch, "unlabeled1")
    mask, u_mix = strong_view(k_mix, u0, u1)
    tg = teacher_targets(r, state.gen_teacher, u0, u1, mask, k_tg, state.step)

    def loss_fn(params):
        (out_l, out_u), stats, _ = forward(r, state.gen_student, params, (x_l, u_mix), k_gen)
        terms = {"sup_gen": supervised_loss(r, out_l["logits"], y),
                 "unsup_gen": losses.weighted_cross_entropy(out_u["logits"], tg.labels, tg.confidence, _ignore(r))}
        terms["loss"] = total_loss(r, terms)
        return terms["loss"], (stats, terms)

    (_, (stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.gen_student.params)
    gen, gen_opt = sgd_update(r, state.gen_student, state.gen_opt_state, grads, stats)
    metrics = {**_base_metrics(r, state), "confidence_gen": jnp.mean(tg.confidence), **terms}
    return state.replace(step=state.step + 1, gen_student=gen, gen_opt_state=gen_opt,
                         gen_teacher=teacher_ema(r, state.gen_teacher, tg, gen)), metrics


def supervised_step(r: Recipe, state: TrainState, batch: dict, assignment: Optional[dict] = None):
    """The Gen-Student on the labelled batch alone."""
    _, k_gen, _, _, _ = _keys(state)
    x_l, y = weak_view(batch, "image"), batch["label"].astype(jnp.int32)

    def loss_fn(params):
        (out,), stats, _ = forward(r, state.gen_student, params, (x_l,), k_gen)
        terms = {"sup_gen": supervised_loss(r, out["logits"], y)}
        terms["loss"] = total_loss(r, terms)
        return terms["loss"], (stats, terms)

    (_, (stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.gen_student.params)
    gen, gen_opt = sgd_update(r, state.gen_student, state.gen_opt_state, grads, stats)
    return state.replace(step=state.step + 1, gen_student=gen, gen_opt_state=gen_opt), {**_base_metrics(r, state),
                                                                                        **terms}


MODE_STEPS = {"stpg": stpg_step, "mean_teacher": mean_teacher_step, "supervised": supervised_step}


def train_step(recipe: Recipe, state: TrainState, batch: dict, assignment: Optional[dict] = None):
    """The configured mode's step; jit it with ``recipe`` static (``stpg_jax.build``)."""
    return MODE_STEPS[recipe.mode](recipe, state, batch, assignment)
