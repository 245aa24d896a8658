"""Training: one loop (`training_loop`) made of small steps, and the state it runs on (`Trainer`).

`train(config, exp_dir)` trains the model of a recipe into exp_dir/model/. If last.pt is there it
resumes exactly where that run stopped: same parameters, optimizer, scheduler, RNG streams and
position in the epoch, so an interrupted and resumed run ends with the same parameters as an
uninterrupted one. Ctrl-C or SIGTERM finishes the current update, writes last.pt and exits.

Under torchrun every rank runs the same loop on its own share of each update's batches; rank 0
alone validates, logs and writes files (nmt.distributed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nmt import distributed
from nmt.average import EMA, keep_step_checkpoint, restore_kept
from nmt.batches import Batch, collate, token_batches
from nmt.checkpoint import load_checkpoint, load_state, save_checkpoint
from nmt.config import Config, TrainConfig, config_to_dict, save_config
from nmt.device import autocast, machine, resolve_device, resolve_precision
from nmt.distributed import World
from nmt.errors import Interrupted, NmtError
from nmt.evaluate import score
from nmt.finetune import init_weights
from nmt.io import (
    atomic_write_text,
    exclusive_lock,
    read_lines,
    remove_stale_temps,
    versions,
    write_json,
)
from nmt.model import Seq2Seq, build_model
from nmt.search import search_corpus
from nmt.subword import EncodedSplit, OutputVocabulary, SplitSampler, Subwords, load_manifest

LOG_EVERY = 20  # updates between train records in metrics.jsonl
MAX_BAD_STEPS = 5  # consecutive non-finite losses or gradients before training stops


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained on
    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0  # validations since the best one (early stopping)
    train_seconds: float = 0.0  # in updates only
    wall_seconds: float = 0.0  # in the training loop, validation and checkpoints included
    tokens: int = 0  # target tokens trained on
    validated_step: int = 0  # the last step that was validated


# ----------------------------------------------------------------------------------------------
# One update


@dataclass
class Update:
    loss: torch.Tensor  # mean loss per target token of the batch (detached)
    grad_norm: torch.Tensor  # before clipping
    applied: bool  # False: the loss or the gradients were NaN/inf, the parameters stay as they were


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, clip_norm: float = 0.0,
               label_smoothing: float = 0.0, precision: str = "fp32", world: World | None = None) -> Update:
    """One update on one batch: forward (the model's loss), backward, gradient clipping to
    `clip_norm` (0: none) and the optimizer step, unless the loss or the gradients are not finite
    (on any rank of `world`: all ranks skip together). `model` is a Seq2Seq or its DDP wrapper;
    `precision` a resolved one (fp32 | bf16)."""
    with autocast(batch.src_ids.device, precision):
        loss = model(batch.src_ids, batch.src_lens, batch.tgt_in, batch.tgt_out, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP, this also averages the gradients over the ranks
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm or math.inf)
    bad = int(not (torch.isfinite(loss) and torch.isfinite(grad_norm)))
    applied = distributed.agree(world or World(), [bad], loss.device)[0] == 0
    if applied:
        optimizer.step()
    return Update(loss.detach(), grad_norm, applied)


# ----------------------------------------------------------------------------------------------
# The state of a run


@dataclass
class TrainingData:
    """What the spm stage left for training, targets already in output ids."""

    train: EncodedSplit
    valid: EncodedSplit
    valid_refs: list[str]  # raw validation references, for BLEU
    valid_path: Path  # the validation source text, for warnings
    subwords: Subwords
    vocab: OutputVocabulary
    spm_paths: dict[str, Path]  # src/tgt SentencePiece model files, copied into checkpoints
    vocab_size: dict  # the manifest's vocab_size: src, tgt, output
    sampler: SplitSampler | None = None  # subword regularization: `train` segmented anew each epoch


def load_training_data(config: Config, exp_dir: Path) -> TrainingData:
    spm_dir = exp_dir / "spm"
    manifest = load_manifest(spm_dir, config.name)
    spm_paths = {side: spm_dir / manifest["models"][side] for side in ("src", "tgt")}
    vocab = OutputVocabulary.of(manifest, spm_dir / "manifest.json")
    splits = [EncodedSplit.load(spm_dir / f"{name}.npz", manifest["vocab_size"]) for name in ("train", "valid")]
    subwords = Subwords.load(spm_paths["src"], spm_paths["tgt"])
    sampler = SplitSampler.for_training(config, exp_dir, manifest, subwords, vocab, splits[0])
    for split in splits:
        split.tgt_ids = vocab.to_output(split.tgt_ids)
    return TrainingData(splits[0], splits[1], read_lines(exp_dir / "data" / "valid.tgt"), exp_dir / "data" / "valid.src",
                        subwords, vocab, spm_paths, manifest["vocab_size"], sampler)


def build_optimizer(model: Seq2Seq, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # fused: one kernel over all parameters instead of a dozen elementwise passes each
    return torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                            fused=device.type in ("cpu", "cuda"))


def build_scheduler(t: TrainConfig, optimizer):
    if t.schedule == "plateau":  # on validation BLEU: higher is better
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=t.plateau_factor, patience=t.plateau_patience, min_lr=t.min_lr)
    if t.schedule == "warmup":  # linear warmup, then inverse square root decay
        warmup = max(1, t.warmup_steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1))))
    return None


class Trainer:
    """The state of one training run: data, model, optimizer, schedule and progress, and the
    checkpoints that save and restore all of it."""

    def __init__(self, config: Config, exp_dir: Path, world: World | None = None,
                 device: torch.device | None = None):
        t = config.train
        self.config, self.out = config, exp_dir / "model"
        self.world = world or World()
        self.device = device or resolve_device(t.device)
        self.data = load_training_data(config, exp_dir)
        self.precision = resolve_precision(t.precision, self.device, "train.precision", log=self.log)
        if t.threads > 0:  # on one CPU, the processes share the threads
            share = self.world.size if self.device.type == "cpu" else 1
            torch.set_num_threads(max(1, t.threads // share))
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        self.model = build_model(config.model, self.data.vocab_size["src"], self.data.vocab.size).to(self.device)
        if t.compile:
            # A decoder step is dozens of small elementwise ops; fused, they cost less than their
            # calls. Dynamic shapes: the batch size and source length change with every batch.
            self.model.decoder.recur = torch.compile(self.model.decoder.recur, dynamic=True)
        self.forward_model = distributed.wrap(self.model, self.world, self.device)
        if self.world.active:
            torch.manual_seed(t.seed + self.world.rank)  # its own dropout masks on every rank
        self.optimizer = build_optimizer(self.model, t, self.device)
        self.scheduler = build_scheduler(t, self.optimizer)
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.progress = Progress()
        self.init_from: dict | None = None  # fine-tuning: the checkpoint it started from, and its step
        # Called on rank 0 with (step, valid BLEU) after each validation; a true result stops the
        # run as early stopping does (a sweep prunes a trial so: its checkpoints stay valid).
        self.on_validation: Callable[[int, float], bool] | None = None
        self.stop_asked = False

    def log(self, text: str) -> None:
        """The one way training talks: a line on stdout from rank 0, below the progress bar."""
        if self.world.is_main:
            tqdm.write(text)

    def last_good(self, name: str = "last.pt") -> str:
        """What a stop for NaN/inf leaves the user with."""
        path = self.out / name
        return f"{path} keeps the last good state" if path.is_file() else f"no {name} was written yet"

    def weights_payload(self) -> dict:
        """What best.pt and the step checkpoints hold, all that translation needs: the weights
        validation scores (the EMA's, with train.ema_decay), the recipe and the SentencePiece models."""
        return {
            "model": self.ema.weights(self.model) if self.ema is not None else self.model.state_dict(),
            "progress": asdict(self.progress),
            "config": config_to_dict(self.config),
            "init_from": self.init_from,
            "spm": {side: path.read_bytes() for side, path in self.data.spm_paths.items()},
            "spm_paths": {side: str(path) for side, path in self.data.spm_paths.items()},
            "vocab_size": {**self.data.vocab_size, "output": self.data.vocab.size},
            "output_vocab": self.data.vocab.record(),
            "num_parameters": self.model.num_parameters(),
            "versions": versions(),
        }

    def payload(self) -> dict:
        """What last.pt holds: the whole state of the run, for an exact resume (the raw weights)."""
        return {
            **self.weights_payload(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "ranks": distributed.gather_objects(self.world, (torch.get_rng_state(), random.getstate()))},
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def check_finite(self, name: str) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise NmtError(f"parameters became NaN/inf at step {self.progress.step}; {self.last_good(name)} "
                           "(try a lower train.lr or train.clip_norm)")

    def save(self, name: str) -> None:
        self.check_finite(name)
        payload = self.payload()  # every rank takes part (its RNG state); rank 0 writes
        if self.world.is_main:
            save_checkpoint(self.out / name, payload)

    def save_validated(self, bleu: float, best: bool) -> None:
        """The weights just validated, with their BLEU: best.pt if `best`, and the step checkpoint
        train.keep_checkpoints asks for. Rank 0 writes (there is no RNG state to gather)."""
        t = self.config.train
        if not (best or t.keep_checkpoints):
            return
        self.check_finite("best.pt")  # on every rank, so that all stop together
        if not self.world.is_main:
            return
        payload = {**self.weights_payload(), "validation": {"step": self.progress.step, "valid_bleu": bleu}}
        if best:
            save_checkpoint(self.out / "best.pt", payload)
        if t.keep_checkpoints:
            keep_step_checkpoint(self.out, payload, t)

    def resume(self, path: Path) -> None:
        payload = load_checkpoint(path, resume=True)
        if payload["config"]["model"] != config_to_dict(self.config)["model"]:
            raise NmtError(
                f"{path}: was trained with a different model section; use another --exp directory "
                "or remove it to start afresh"
            )
        load_state(self.model, payload["model"], path)
        self.optimizer.load_state_dict(payload["optimizer"])
        saved_lr = payload["config"]["train"]["lr"]
        if saved_lr != self.config.train.lr:  # the recipe's lr was changed: the user wants it now
            self.log(f"train.lr changed from {saved_lr} to {self.config.train.lr}: using the new value")
            for group in self.optimizer.param_groups:
                group["lr"] = self.config.train.lr
        if self.scheduler is not None and payload["scheduler"] is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        torch_state, python_state = payload["rng"]["torch"], payload["rng"]["python"]
        ranks = payload["rng"].get("ranks") or []
        if self.world.active and len(ranks) == self.world.size:
            torch_state, python_state = ranks[self.world.rank]
        torch.set_rng_state(torch_state)
        random.setstate(_as_tuple(python_state))
        self.progress = Progress(**payload["progress"])
        self.init_from = payload.get("init_from")  # a fine-tune resumes: its start is not re-applied
        if self.ema is not None:  # a run without one starts its average from the weights resumed
            self.ema = EMA(self.model, self.config.train.ema_decay)
            if payload.get("ema") is not None:
                self.ema.load_state_dict(payload["ema"], path)

    def start_from(self) -> None:
        """Fine-tuning (train.init_from): the checkpoint's weights, with this run's fresh optimizer,
        schedule and step count (nmt.finetune)."""
        weights, self.init_from, checkpoint = init_weights(self.config, self.data.spm_paths, self.data.vocab.record())
        load_state(self.model, weights, checkpoint)
        if self.ema is not None:  # the average starts from the weights fine-tuning starts from
            self.ema = EMA(self.model, self.config.train.ema_decay)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------
# The run


def train(config: Config, exp_dir: Path, on_validation: Callable[[int, float], bool] | None = None) -> dict:
    """Train (or resume) the recipe's model; returns what it writes to model/summary.json.
    `on_validation(step, valid_bleu)` is called after each validation (rank 0); returning True
    stops training after that update, with last.pt, best.pt and summary.json written as usual."""
    device = resolve_device(config.train.device)
    world = distributed.join(device)
    try:
        trainer = Trainer(config, exp_dir, world, distributed.rank_device(world, device))
        trainer.on_validation = on_validation
        lock = exclusive_lock(trainer.out / "train.lock", trainer.log) if world.is_main else contextlib.nullcontext()
        with lock:
            start_or_resume(trainer)
            with stop_requests() as stop, open_metrics(trainer) as metrics:
                finished = training_loop(trainer, metrics, stop)
            if not finished:  # the CLI adds how to resume, with the arguments as given
                raise Interrupted(f"interrupted at step {trainer.progress.step}; saved {trainer.out / 'last.pt'}")
            return write_summary(trainer)
    finally:
        distributed.leave(world)


def training_loop(trainer: Trainer, metrics, stop: dict) -> bool:
    """Train until max_epochs, max_steps, max_minutes or early stopping (True), or until a stop
    request (False). Under torchrun, rank r trains on batches[i + r] of every group of world-size
    batches; a group is one update, and batch_in_epoch counts the batches of all ranks."""
    t, p, world = trainer.config.train, trainer.progress, trainer.world
    clock = Clock(p, t.max_minutes)
    window = Window()  # the train record's loss, tokens and time since the last one
    bad_steps = 0  # consecutive batches with a non-finite loss or gradients
    stopping = False
    done = should_stop(trainer, clock.over_budget())  # a resumed run that had stopped stays stopped
    trainer.forward_model.train()
    while not (done or stopping) and p.epoch < t.max_epochs:
        if trainer.data.sampler is not None:  # subword regularization: this epoch's segmentation
            trainer.data.train = trainer.data.sampler.sample(t.seed, p.epoch)
        batches = token_batches(trainer.data.train, t.batch_tokens, t.seed, p.epoch, t.max_len)
        usable = len(batches) - len(batches) % world.size  # every rank takes the same number
        bar = tqdm(total=usable, initial=p.batch_in_epoch, desc=f"epoch {p.epoch + 1}", unit="batch",
                   dynamic_ncols=True, leave=False, disable=not world.is_main)
        while not (done or stopping) and p.batch_in_epoch < usable:
            started = time.perf_counter()
            batch = collate(trainer.data.train, batches[p.batch_in_epoch + world.rank]).to(trainer.device)
            update = train_step(trainer.forward_model, trainer.optimizer, batch, t.clip_norm,
                                t.label_smoothing, trainer.precision.name, world)
            p.batch_in_epoch += world.size
            tokens = batch.num_tgt_tokens
            all_tokens, stops, over_time = distributed.agree(
                world, [tokens, int(stop["signal"] is not None), int(clock.over_budget())], trainer.device)
            stopping = stops > 0
            if not update.applied:
                bad_steps = skip_update(trainer, update, bad_steps + 1)
                if stopping:
                    trainer.save("last.pt")
                continue
            bad_steps = 0
            if trainer.ema is not None:
                trainer.ema.update(trainer.model)
            p.step += 1
            p.tokens += all_tokens
            seconds = time.perf_counter() - started
            p.train_seconds += seconds
            window.add(float(update.loss) * tokens, tokens, seconds)
            bar.update(world.size)
            step_schedule(trainer)
            if p.step % LOG_EVERY == 0:
                log_train(trainer, metrics, window, bar, clock)
            if p.step % t.valid_every == 0:
                validation = validate_on_main(trainer)
                step_schedule(trainer, validation)
                record_validation(trainer, metrics, validation)
            done = should_stop(trainer, bool(over_time))
            if p.step % t.checkpoint_every == 0 or done or stopping:
                trainer.save("last.pt")
        bar.close()
        if p.batch_in_epoch >= usable:
            p.epoch += 1
            p.batch_in_epoch = 0
    if stopping:
        return False
    if p.validated_step != p.step:  # the last updates were not validated yet
        validation = validate_on_main(trainer)
        step_schedule(trainer, validation)
        record_validation(trainer, metrics, validation)
    clock.seconds()
    trainer.save("last.pt")
    return True


# ----------------------------------------------------------------------------------------------
# The loop's steps


class Clock:
    """Wall time of the run so far, resumed runs included (kept in progress.wall_seconds), against
    the time budget train.max_minutes (0: none)."""

    def __init__(self, progress: Progress, max_minutes: float):
        self.progress, self.max_minutes = progress, max_minutes
        self.before, self.start = progress.wall_seconds, time.perf_counter()

    def seconds(self) -> float:
        self.progress.wall_seconds = self.before + time.perf_counter() - self.start
        return self.progress.wall_seconds

    def over_budget(self) -> bool:
        seconds = self.seconds()  # always: it keeps progress.wall_seconds current
        return bool(self.max_minutes and seconds >= 60 * self.max_minutes)


@dataclass
class Window:
    """What the next train record averages over."""

    loss_sum: float = 0.0  # loss × tokens
    tokens: int = 0
    seconds: float = 0.0

    def add(self, loss_sum: float, tokens: int, seconds: float) -> None:
        self.loss_sum += loss_sum
        self.tokens += tokens
        self.seconds += seconds

    def reset(self) -> None:
        self.loss_sum, self.tokens, self.seconds = 0.0, 0, 0.0


def should_stop(trainer: Trainer, over_time: bool) -> bool:
    """The step budget, the time budget, early stopping or on_validation says stop (max_epochs:
    the loop's)."""
    t, p = trainer.config.train, trainer.progress
    patience_out = t.patience > 0 and p.bad_validations >= t.patience
    return bool(trainer.stop_asked or patience_out or over_time or (t.max_steps and p.step >= t.max_steps))


def skip_update(trainer: Trainer, update: Update, bad_steps: int) -> int:
    """Warn about a batch whose loss or gradients were not finite (its update was skipped); stop
    after MAX_BAD_STEPS of them in a row. Returns the count."""
    p = trainer.progress
    trainer.log(f"warning: step {p.step + 1}: loss {float(update.loss):.4g}, gradient norm "
                f"{float(update.grad_norm):.4g}; update skipped ({bad_steps} in a row)")
    if bad_steps >= MAX_BAD_STEPS:
        raise NmtError(f"loss or gradients were NaN/inf for {bad_steps} batches in a row at step {p.step}; "
                       f"stopped without saving them: {trainer.last_good()} (try a lower train.lr or "
                       "train.clip_norm)")
    return bad_steps


def step_schedule(trainer: Trainer, validation: dict | None = None) -> None:
    """The learning rate changes here only: called after every update (warmup moves), and after
    every validation with its result (plateau moves, on its BLEU)."""
    schedule = trainer.config.train.schedule
    if schedule == "warmup" and validation is None:
        trainer.scheduler.step()
    elif schedule == "plateau" and validation is not None:
        trainer.scheduler.step(validation["valid_bleu"])


@torch.no_grad()
def validate(trainer: Trainer) -> dict:
    """Validation loss and perplexity (teacher forcing), and greedy BLEU against the references.
    Bounded as training and translation are: pairs with a side over train.max_len subwords are
    left out of the loss, and sources are cut to decode.max_src_len for the BLEU decode (one
    extreme line must not need an attention matrix of hundreds of GB; see warn_long_valid_lines)."""
    model, data, config = trainer.model, trainer.data, trainer.config
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for indices in token_batches(data.valid, config.train.batch_tokens, 0, 0, config.train.max_len, shuffle=False):
        batch = collate(data.valid, indices).to(trainer.device)
        with autocast(trainer.device, trainer.precision.name):
            loss = model(batch.src_ids, batch.src_lens, batch.tgt_in, batch.tgt_out)
        total_loss += float(loss) * batch.num_tgt_tokens
        total_tokens += batch.num_tgt_tokens
    greedy = dataclasses.replace(config.decode, beam_size=1)
    src_seqs = [data.valid.src(i)[: config.decode.max_src_len].tolist() for i in range(len(data.valid))]
    hyps = search_corpus(model, src_seqs, greedy, trainer.precision.name)
    texts = data.subwords.decode_tgt([data.vocab.to_spm(h[0].tokens) for h in hyps])
    model.train()
    valid_loss = total_loss / max(1, total_tokens)
    return {"valid_loss": valid_loss, "valid_ppl": math.exp(min(valid_loss, 50.0)),
            "valid_bleu": score(texts, [data.valid_refs])["bleu"]}


def warn_long_valid_lines(trainer: Trainer, shown: int = 5) -> None:
    """Name the validation lines that validate() bounds, once, at the start."""
    t, decode, valid = trainer.config.train, trainer.config.decode, trainer.data.valid
    src, tgt = valid.src_lengths, valid.tgt_lengths
    long = [int(i) for i in ((src > t.max_len) | (tgt > t.max_len) | (src > decode.max_src_len)).nonzero()[0]]
    for i in long[:shown]:
        trainer.log(f"warning: {trainer.data.valid_path}:{i + 1}: {src[i]} source / {tgt[i]} target subwords: "
                    f"left out of the validation loss over train.max_len {t.max_len}, source cut to "
                    f"decode.max_src_len {decode.max_src_len} for validation BLEU")
    if len(long) > shown:
        trainer.log(f"warning: {len(long) - shown} more validation lines like these")


def validate_on_main(trainer: Trainer) -> dict:
    """Validate on rank 0 (the EMA's weights, with train.ema_decay) and share its BLEU, so that
    every rank keeps the same best-model, schedule and early-stopping bookkeeping."""
    started = time.perf_counter()
    main = trainer.world.is_main
    averaged = main and trainer.ema is not None
    with trainer.ema.applied(trainer.model) if averaged else contextlib.nullcontext():
        result = validate(trainer) if main else {}
    result["valid_bleu"] = distributed.broadcast_float(trainer.world, result.get("valid_bleu", 0.0), trainer.device)
    result["valid_seconds"] = time.perf_counter() - started
    return result


def record_validation(trainer: Trainer, metrics, result: dict) -> None:
    """Keep the best: best.pt when the BLEU improved, the step checkpoints, the count towards early
    stopping; the record."""
    p, world = trainer.progress, trainer.world
    p.validated_step = p.step
    improved = result["valid_bleu"] > p.best_bleu
    if improved:
        p.best_bleu, p.best_step, p.bad_validations = result["valid_bleu"], p.step, 0
    else:
        p.bad_validations += 1
    trainer.save_validated(result["valid_bleu"], best=improved)
    if world.is_main:
        lr = trainer.optimizer.param_groups[0]["lr"]
        seconds = result.pop("valid_seconds")
        record = {"step": p.step, "epoch": p.epoch + 1, **result, "lr": lr, "elapsed": p.train_seconds,
                  "wall": p.wall_seconds, "valid_seconds": seconds}
        write_record(metrics, record)
        trainer.log(f"step {p.step}: valid loss {result['valid_loss']:.3f} ppl {result['valid_ppl']:.1f} "
                    f"BLEU {result['valid_bleu']:.2f}{' (best)' if improved else ''} lr {lr:.2g}")
    if trainer.on_validation is not None:  # rank 0 decides; every rank stops at the same update
        stop = world.is_main and bool(trainer.on_validation(p.step, result["valid_bleu"]))
        trainer.stop_asked = distributed.broadcast_float(world, float(stop), trainer.device) > 0


def log_train(trainer: Trainer, metrics, window: Window, bar, clock: Clock) -> None:
    """The train record: loss of this rank's batches, tokens/s of all ranks together."""
    p, world = trainer.progress, trainer.world
    lr = trainer.optimizer.param_groups[0]["lr"]
    record = {"step": p.step, "epoch": p.epoch + 1, "train_loss": window.loss_sum / window.tokens,
              "lr": lr, "tokens_per_s": window.tokens * world.size / window.seconds,
              "elapsed": p.train_seconds, "wall": clock.seconds()}
    write_record(metrics, record)
    bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{lr:.2g}",
                    step=p.step)
    window.reset()


def write_record(metrics, record: dict) -> None:
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()


# ----------------------------------------------------------------------------------------------
# Before and after the loop


def start_or_resume(trainer: Trainer) -> None:
    """Resume from last.pt if there is one, else start afresh; summary.json (make's target) goes
    until the run finishes."""
    out, config = trainer.out, trainer.config
    main = trainer.world.is_main
    metrics_path = out / "metrics.jsonl"
    if main:
        remove_stale_temps(out)  # a killed run's half-written checkpoint
    if (out / "last.pt").is_file():
        trainer.resume(out / "last.pt")
        trainer.log(f"resuming from {out / 'last.pt'} at step {trainer.progress.step}")
        started = trainer.init_from["path"] if trainer.init_from else None
        if config.train.init_from and not (started and Path(started).is_relative_to(Path(config.train.init_from).resolve())):
            trainer.log(f"train.init_from is not applied: the run in {out} resumes as it started "
                        f"(from {started or 'scratch'}); fine-tune in another --exp directory")
        if main:
            _truncate_metrics(metrics_path, trainer.progress.step)
    else:
        if config.train.init_from:  # fine-tuning; a resume (above) never re-applies it
            trainer.start_from()
            trainer.log(f"fine-tuning from {trainer.init_from['path']} (its step {trainer.init_from['step']}): "
                        "fresh optimizer, schedule and step count")
        if main:
            metrics_path.unlink(missing_ok=True)
    if main:
        restore_kept(out, trainer.progress.step, config.train)  # step checkpoints as of that step
        (out / "summary.json").unlink(missing_ok=True)
        save_config(config, out / "config.yaml")
    world = f", {trainer.world.size} processes" if trainer.world.active else ""
    trainer.log(f"model: {trainer.model.num_parameters():,} parameters ({config.model.cell}, "
                f"attention {config.model.attention}); device {trainer.device}, "
                f"{torch.get_num_threads()} threads{world}")
    warn_long_valid_lines(trainer)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from: they will be redone. A record that
    cannot be read (a partial last line after a kill, a damaged file) is dropped too: a log line
    never stops a resume."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def open_metrics(trainer: Trainer):
    """metrics.jsonl, appended to (rank 0; the others write nowhere)."""
    path = trainer.out / "metrics.jsonl" if trainer.world.is_main else os.devnull
    return open(path, "a", encoding="utf-8")


@contextlib.contextmanager
def stop_requests():
    """Ctrl-C and SIGTERM ask the loop to stop after the current update: {'signal': number}."""
    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signum

    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def write_summary(trainer: Trainer) -> dict:
    p, config = trainer.progress, trainer.config
    summary = {
        "steps": p.step, "epochs": p.epoch, "best_valid_bleu": p.best_bleu, "best_step": p.best_step,
        "train_seconds": p.train_seconds, "wall_seconds": p.wall_seconds, "target_tokens": p.tokens,
        "tokens_per_second": p.tokens / max(p.train_seconds, 1e-9),
        "num_parameters": trainer.model.num_parameters(), "processes": trainer.world.size,
        "precision": trainer.precision.record(), "machine": machine(), "init_from": trainer.init_from,
        "config": config_to_dict(config), "versions": versions(),
    }
    if trainer.world.is_main:
        write_json(trainer.out / "summary.json", summary)
    return summary
