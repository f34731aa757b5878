"""One STPG training step (DESIGN.md §2 and §3) as a pure function, plus the 'supervised' and 'mean_teacher' modes.

`make_train_step` closes over the model, the optimiser and static settings and returns
``step(state, batch) -> (state, metrics)``, ready for ``jax.jit`` with the state donated. The batch holds uint8
images (normalised here, on the device) and int32 labels:
``image (Bl,S,S,3)``, ``label (Bl,S,S)``, ``unlabeled0``/``unlabeled1`` ``(Bu,S,S,3)``.

A network that sees several inputs (a student: x_l then u_mix; a teacher: u0, u1, then x_l for the bank) sees them
joined in one pass. With ``StepSettings.bn_per_input`` each input is normalised by its own BatchNorm statistics and
the running averages move once per input, in that order, as the released code's separate passes (DESIGN.md §8.1).

The STPG step takes a third argument, the assignment its contrastive losses use (``{'assignment': (C,) int32,
'matched': () bool}``). With ``same_step_assignment`` (the release, DESIGN.md §8.3) that is the matching of the
prototypes this very step updates, which the host computes from the step's output
(``stpg_jax.host_matching.SameStepMatching`` starts the step with a guess and runs it again when the matching
differs); the bank's proximity ranking uses the assignment the state carries from before the update. The output
state carries the loss's assignment. Without it (or None), the loss uses the state's assignment.

Under a data-parallel mesh the step is the same function: batches are sharded along the batch axis and the
state replicated, so means, BatchNorm statistics and the pixel-selection confusion matrix cover the global batch.
Where one network sees several inputs in one pass (a student: labelled and mixed images; a teacher: both weak views),
they are joined per device (``StepSettings.batch_groups``), so their images and outputs stay on the device that
loaded them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from stpg_jax import losses, sharding
from stpg_jax.data.augment import normalize
from stpg_jax.models.batchnorm import BEFORE_LAST_GROUP
from stpg_jax.state import ContrastState, Network, TrainState, ema


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the step (everything else arrives as arrays)."""

    mode: str = "stpg"
    num_classes: int = 21
    ignore_index: int = 255
    supervised_loss: str = "ce"
    ohem_threshold: float = 0.7
    ohem_min_kept: int = 50000
    ohem_class_weights: tuple = ()
    unsup_weight: float = 1.0
    contrastive_weight: float = 0.1
    ema_decay: float = 0.99
    cross_supervision: bool = True
    selection: str = "consistent+high"
    contrastive: bool = True
    contrastive_temperature: float = 0.5
    prototype_momentum: float = 0.99
    bank_source: str = "gen_teacher"
    bank_n_add: int = 56
    bank_confidence: float = 0.95
    # Schedule in steps (DESIGN.md §3, converted from epochs by the trainer).
    bank_start_step: int = 0
    contrastive_start_step: int = 0
    proximity_start_step: int = 0
    # Devices the batch axis is split over (the mesh's size; set by whoever compiles the step). Images of different
    # inputs that one network sees in one pass are concatenated device by device (stpg_jax.sharding.concat_local),
    # so none moves between devices.
    batch_groups: int = 1
    # DESIGN.md §8.1 and §8.3 (see the module docstring).
    bn_per_input: bool = True
    same_step_assignment: bool = True

    @classmethod
    def from_config(cls, config, num_classes: int, steps_per_epoch: int, batch_groups: int = 1) -> "StepSettings":
        t = config.stpg
        return cls(
            mode=config.mode,
            num_classes=num_classes,
            ignore_index=config.data.ignore_index,
            supervised_loss=config.loss.supervised,
            ohem_threshold=config.loss.ohem_threshold,
            ohem_min_kept=config.loss.ohem_min_kept,
            ohem_class_weights=tuple(config.loss.ohem_class_weights),
            unsup_weight=config.loss.unsup_weight,
            contrastive_weight=config.loss.contrastive_weight,
            ema_decay=t.ema_decay,
            cross_supervision=t.cross_supervision,
            selection=t.selection,
            contrastive=t.contrastive,
            contrastive_temperature=t.contrastive_temperature,
            prototype_momentum=t.prototype_momentum,
            bank_source=t.bank_source,
            bank_n_add=config.data.batch_labeled * t.bank_k,
            bank_confidence=t.bank_confidence,
            bank_start_step=t.bank_start_epoch * steps_per_epoch,
            contrastive_start_step=t.contrastive_start_epoch * steps_per_epoch,
            proximity_start_step=t.proximity_start_epoch * steps_per_epoch,
            batch_groups=batch_groups,
            bn_per_input=config.model.get("bn_statistics", "joined") == "per_input",
            same_step_assignment=t.get("assignment_timing", "previous_step") == "same_step",
        )


def _downsample_nhwc(x, size):
    """Nearest-neighbour (B, H, W, C) → (B, h, w, C) with PyTorch's index rule."""
    return jnp.moveaxis(losses.nearest_resize(jnp.moveaxis(x, -1, 1), size), 1, -1)


def make_train_step(model, tx, schedule, s: StepSettings):
    """Returns the pure step function of the configured mode."""

    def forward(net: Network, params, images, key, sizes=None, before_last=False):
        """The network on ``images`` (the inputs of batch sizes ``sizes`` joined by ``join``). train=True: batch
        statistics in BatchNorm and dropout on, for students and teachers alike (as released). ``before_last``: also
        the running averages as they were before the last input's update."""
        grouped = s.bn_per_input and sizes is not None and len(sizes) > 1
        net_model = model.clone(bn_groups=sharding.group_ids(sizes, s.batch_groups)) if grouped else model
        collections = ["batch_stats"] + ([BEFORE_LAST_GROUP] if before_last and grouped else [])
        out, mutated = net_model.apply(
            {"params": params, "batch_stats": net.batch_stats},
            images,
            train=True,
            rngs={"dropout": key},
            mutable=collections,
        )
        if len(collections) > 1:
            return out, (mutated["batch_stats"], mutated[BEFORE_LAST_GROUP])
        return out, mutated["batch_stats"]

    def supervised_loss(logits, labels):
        if s.supervised_loss == "ohem":
            return losses.ohem_cross_entropy(
                logits,
                labels,
                threshold=s.ohem_threshold,
                min_kept=s.ohem_min_kept,
                class_weights=s.ohem_class_weights or None,
                ignore_index=s.ignore_index,
            )
        return losses.cross_entropy(logits, labels, ignore_index=s.ignore_index)

    def sgd_update(net: Network, opt_state, grads, batch_stats):
        updates, opt_state = tx.update(grads, opt_state, net.params)
        return Network(optax.apply_updates(net.params, updates), batch_stats), opt_state

    def join(*parts):
        return sharding.concat_local(parts, s.batch_groups)

    def split(out: dict, sizes) -> list[dict]:
        """A network's outputs on ``join``ed inputs, one dict per input."""
        pieces = {k: sharding.split_local(v, sizes, s.batch_groups) for k, v in out.items()}
        return [{k: v[i] for k, v in pieces.items()} for i in range(len(sizes))]

    def step(state: TrainState, batch: dict[str, Any], assignment: dict | None = None):
        key = jax.random.fold_in(state.rng, state.step)
        k_mix, k_gen, k_pro, k_tg, k_tp = jax.random.split(key, 5)

        # 1. Weak views (augmented on the host), normalised here.
        x_l = normalize(batch["image"], batch.get("image_box"))
        y = batch["label"].astype(jnp.int32)
        n_l = x_l.shape[0]
        metrics = {"lr": schedule(state.step)}

        if s.mode == "supervised":
            def loss_fn(params):
                out, stats = forward(state.gen_student, params, x_l, k_gen)
                loss = supervised_loss(out["logits"], y)
                return loss, (stats, {"loss": loss, "sup_gen": loss})

            (_, (stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.gen_student.params)
            gen, gen_opt = sgd_update(state.gen_student, state.gen_opt_state, grads, stats)
            metrics.update(terms)
            return state.replace(step=state.step + 1, gen_student=gen, gen_opt_state=gen_opt), metrics

        u0 = normalize(batch["unlabeled0"], batch.get("unlabeled0_box"))
        u1 = normalize(batch["unlabeled1"], batch.get("unlabeled1_box"))
        n_u, height, width = u0.shape[:3]

        # 2. Strong view: CutMix of the two unlabelled batches.
        mask = losses.cutmix_box_mask(k_mix, n_u, height, width)
        u_mix = losses.mix(u0, u1, mask)
        students_in = join(x_l, u_mix)

        # 4. Teachers on the weak views; pseudo-labels from mixed logits. The bank's source teacher also sees x_l.
        # Returns the teacher's outputs on x_l (or None) for the memory bank.
        def teacher_pass(teacher: Network, k, with_labelled: bool):
            parts = (u0, u1, x_l) if with_labelled else (u0, u1)
            sizes = [p.shape[0] for p in parts]
            # Per input, the labelled pass counts in the running averages from the bank's start on (DESIGN.md §8.1).
            late = with_labelled and s.bn_per_input
            out, stats = forward(teacher, teacher.params, join(*parts), k, sizes, before_last=late)
            if late:
                with_l, without_l = stats
                stats = jax.tree_util.tree_map(lambda a, b: jnp.where(state.step >= s.bank_start_step, a, b),
                                               with_l, without_l)
            outs = split(jax.lax.stop_gradient(out), sizes)
            labels, confidence = losses.pseudo_labels(outs[0]["logits"], outs[1]["logits"], mask)
            return labels, confidence, outs[2] if with_labelled else None, stats

        bank_from_pro = s.mode == "stpg" and s.bank_source == "pro_teacher"
        with_bank = s.mode == "stpg" and s.contrastive
        yhat_g, conf_g, tg_on_l, tg_stats = teacher_pass(state.gen_teacher, k_tg, with_bank and not bank_from_pro)
        metrics["confidence_gen"] = jnp.mean(conf_g)

        if s.mode == "mean_teacher":
            def loss_fn(params):
                out, stats = forward(state.gen_student, params, students_in, k_gen, (n_l, n_u))
                out_l, out_u = split(out, (n_l, n_u))
                sup = supervised_loss(out_l["logits"], y)
                unsup = losses.weighted_cross_entropy(out_u["logits"], yhat_g, conf_g, s.ignore_index)
                loss = sup + s.unsup_weight * unsup
                return loss, (stats, {"loss": loss, "sup_gen": sup, "unsup_gen": unsup})

            (_, (stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.gen_student.params)
            gen, gen_opt = sgd_update(state.gen_student, state.gen_opt_state, grads, stats)
            teacher = ema(state.gen_teacher.replace(batch_stats=tg_stats), gen, s.ema_decay)
            metrics.update(terms)
            return state.replace(step=state.step + 1, gen_student=gen, gen_opt_state=gen_opt,
                                 gen_teacher=teacher), metrics

        yhat_p, conf_p, tp_on_l, tp_stats = teacher_pass(state.pro_teacher, k_tp, with_bank and bank_from_pro)
        metrics["confidence_pro"] = jnp.mean(conf_p)
        # Cross supervision: the professional student learns from the Gen-Teacher and vice versa.
        if s.cross_supervision:
            pro_target, pro_conf, gen_target, gen_conf = yhat_g, conf_g, yhat_p, conf_p
        else:
            pro_target, pro_conf, gen_target, gen_conf = yhat_p, conf_p, yhat_g, conf_g

        # 8 (bank part). Prototypes, then the bank, from the source teacher's features on x_l (DESIGN.md §3 order).
        contrast = state.contrast
        assigned = contrast.assigned_anchors()  # before this step's update: the bank's proximity ranking
        if s.same_step_assignment and assignment is not None and contrast is not None:
            loss_contrast = contrast.replace(assignment=assignment["assignment"], matched=assignment["matched"])
        else:
            loss_contrast = contrast
        loss_anchors = loss_contrast.assigned_anchors() if contrast is not None else None
        if with_bank:
            bank_out = tp_on_l if bank_from_pro else tg_on_l
            feats = bank_out["features"]
            h, w, dim = feats.shape[1:]
            y_small = losses.nearest_resize(y, (h, w))
            probs = jax.nn.softmax(_downsample_nhwc(bank_out["logits"], (h, w)), axis=-1)
            candidates = losses.bank_candidates(probs, y_small, s.bank_confidence, s.ignore_index).reshape(-1)
            flat_feats, flat_labels = feats.reshape(-1, dim), y_small.reshape(-1)

            def update_bank(c: ContrastState) -> ContrastState:
                prototypes = losses.update_prototypes(c.prototypes, flat_feats, flat_labels, candidates,
                                                      s.prototype_momentum)
                bank = losses.update_memory_bank(c.bank, flat_feats, flat_labels, candidates, assigned,
                                                 s.bank_n_add, state.step >= s.proximity_start_step)
                return c.replace(prototypes=prototypes, bank=bank)

            contrast = jax.lax.cond(state.step >= s.bank_start_step, update_bank, lambda c: c, contrast)
            metrics["bank_candidates"] = jnp.sum(candidates.astype(jnp.float32))
            metrics["bank_fill"] = jnp.mean(contrast.bank.count.astype(jnp.float32)) / contrast.bank.features.shape[1]

        def contrastive_terms(features_l, features_u, y_small_l, pseudo_small):
            dim = features_l.shape[-1]
            args = dict(num_classes=s.num_classes, ignore_index=s.ignore_index, temperature=s.contrastive_temperature)
            lab = losses.dual_contrastive_loss(features_l.reshape(-1, dim), y_small_l.reshape(-1), loss_anchors,
                                               contrast.bank.features, contrast.bank.count, **args)
            unl = losses.dual_contrastive_loss(features_u.reshape(-1, dim), pseudo_small.reshape(-1), loss_anchors,
                                               contrast.bank.features, contrast.bank.count, **args)
            # Computed at every step and switched on by a select, not a lax.cond: a cond's outputs include the
            # residuals its gradient needs, which XLA's GPU partitioner gathers whole onto every device (1.1 GB per
            # device per step for VOC on 8 GPUs). Before the start the terms are finite and their gradient is zero.
            on = state.step >= s.contrastive_start_step
            return jnp.where(on, lab, 0.0), jnp.where(on, unl, 0.0)

        def loss_fn(params):
            gen_params, pro_params = params
            # 3 + 5. Students on [x_l, u_mix] in one pass each.
            g_out, g_stats = forward(state.gen_student, gen_params, students_in, k_gen, (n_l, n_u))
            p_out, p_stats = forward(state.pro_student, pro_params, students_in, k_pro, (n_l, n_u))
            (g_on_l, g_on_u), (p_on_l, p_on_u) = split(g_out, (n_l, n_u)), split(p_out, (n_l, n_u))
            g_l, g_u, p_l, p_u = g_on_l["logits"], g_on_u["logits"], p_on_l["logits"], p_on_u["logits"]
            sup_gen, sup_pro = supervised_loss(g_l, y), supervised_loss(p_l, y)

            # 6. Pixel selection for the Pro-Student: its own hard prediction against its teacher's labels.
            pi = jnp.argmax(jax.lax.stop_gradient(p_u), axis=-1)
            selection = losses.select_pixels(pro_target, pi, s.num_classes, variant=s.selection)

            # 7. Weighted CE, normalised by all pixels.
            unsup_gen = losses.weighted_cross_entropy(g_u, gen_target, gen_conf, s.ignore_index)
            unsup_pro = losses.weighted_cross_entropy(p_u, pro_target, pro_conf * selection["keep"], s.ignore_index)
            loss = sup_gen + sup_pro + s.unsup_weight * (unsup_gen + unsup_pro)
            terms = {"sup_gen": sup_gen, "sup_pro": sup_pro, "unsup_gen": unsup_gen, "unsup_pro": unsup_pro}

            # 8. Dual contrastive learning on the Gen-Student's features.
            if s.contrastive:
                h, w = g_on_l["features"].shape[1:3]
                con_l, con_u = contrastive_terms(g_on_l["features"], g_on_u["features"],
                                                 losses.nearest_resize(y, (h, w)),
                                                 losses.nearest_resize(yhat_p, (h, w)))
                loss = loss + s.contrastive_weight * (con_l + con_u)
                terms.update(con_labeled=con_l, con_unlabeled=con_u)
            terms["loss"] = loss
            return loss, (g_stats, p_stats, selection, terms)

        params = (state.gen_student.params, state.pro_student.params)
        (_, (g_stats, p_stats, selection, terms)), (g_grads, p_grads) = jax.value_and_grad(
            loss_fn, has_aux=True)(params)

        # 9. Separate SGD for each student; 10. each teacher is the EMA of its own student.
        gen, gen_opt = sgd_update(state.gen_student, state.gen_opt_state, g_grads, g_stats)
        pro, pro_opt = sgd_update(state.pro_student, state.pro_opt_state, p_grads, p_stats)
        gen_teacher = ema(state.gen_teacher.replace(batch_stats=tg_stats), gen, s.ema_decay)
        pro_teacher = ema(state.pro_teacher.replace(batch_stats=tp_stats), pro, s.ema_decay)

        metrics.update(terms)
        metrics.update(
            kept=jnp.mean(selection["keep"]),
            consistent=jnp.mean(selection["consistent"]),
            highly_mismatched=jnp.mean(selection["high"]),
            mismatch_scores=selection["scores"],
        )
        new_state = state.replace(
            step=state.step + 1,
            gen_student=gen,
            gen_opt_state=gen_opt,
            pro_student=pro,
            pro_opt_state=pro_opt,
            gen_teacher=gen_teacher,
            pro_teacher=pro_teacher,
            contrast=contrast.replace(assignment=loss_contrast.assignment, matched=loss_contrast.matched),
        )
        return new_state, metrics

    return step
