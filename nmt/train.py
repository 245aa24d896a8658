"""The training loop: token batches, Adam, clipping, validation BLEU, early stopping, resume.

`train(config, exp_dir)` trains the model of a recipe into exp_dir/model/. If last.pt is there it
resumes exactly where that run stopped: same parameters, optimizer, scheduler, RNG streams and
position in the epoch, so an interrupted and resumed run ends with the same parameters as an
uninterrupted one. Ctrl-C or SIGTERM finishes the current update, writes last.pt and exits.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nmt import distributed
from nmt.batches import Batch, collate, token_batches
from nmt.checkpoint import load_checkpoint, load_state, save_checkpoint
from nmt.config import Config, config_to_dict, save_config
from nmt.device import machine, resolve_device, resolve_precision
from nmt.errors import NmtError
from nmt.evaluate import score
from nmt.io import read_lines, versions, write_json
from nmt.loss import projected_cross_entropy
from nmt.model import Seq2Seq, autocast, build_model
from nmt.search import search_corpus
from nmt.subword import PAD_ID, EncodedSplit, Subwords, to_output_ids

LOG_EVERY = 20  # updates between train records in metrics.jsonl
MAX_BAD_STEPS = 5  # consecutive non-finite losses before training stops


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


def batch_loss(model: Seq2Seq, batch: Batch, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy per real target token. The vocabulary projection runs once over the
    non-pad positions of the whole batch, not once per decoder step (see nmt.loss)."""
    outputs, _ = model(batch.src_ids, batch.src_lens, batch.tgt_in)  # (batch, tgt_len, output)
    real = batch.tgt_out != PAD_ID
    decoder = (model.module if isinstance(model, DistributedDataParallel) else model).decoder
    hidden = decoder.dropout(outputs[real])  # (tokens, output): what decoder.logits projects
    loss = projected_cross_entropy(hidden, decoder.output.weight, decoder.output.bias,
                                   batch.tgt_out[real], label_smoothing)
    return loss, int(real.sum())


def build_scheduler(config: Config, optimizer):
    t = config.train
    if t.schedule == "plateau":  # on validation BLEU: higher is better
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=t.plateau_factor, patience=t.plateau_patience, min_lr=t.min_lr)
    if t.schedule == "warmup":  # linear warmup, then inverse square root decay
        warmup = max(1, t.warmup_steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1))))
    return None


class Trainer:
    """Owns the model, optimizer, data and progress of one experiment."""

    def __init__(self, config: Config, exp_dir: Path):
        self.config, self.exp_dir = config, exp_dir
        self.out = exp_dir / "model"
        spm_dir = exp_dir / "spm"
        manifest_path = spm_dir / "manifest.json"
        if not manifest_path.is_file():
            raise NmtError(f"{manifest_path} not found: run `nmt spm {config.name}` first")
        self.manifest = json.loads(manifest_path.read_text())
        t = config.train
        device = resolve_device(t.device)
        self.world = distributed.join(device)
        if device.type == "cuda" and self.world.active:
            device = torch.device("cuda", self.world.local_rank)
        self.device = device
        self.precision = resolve_precision(t.precision, device, "train.precision",
                                           log=print if self.world.is_main else (lambda _: None))
        if t.threads > 0:  # on one CPU, processes share the threads
            share = self.world.size if device.type == "cpu" else 1
            torch.set_num_threads(max(1, t.threads // share))
        torch.manual_seed(t.seed)
        random.seed(t.seed)

        self.spm_paths = {side: spm_dir / self.manifest["models"][side] for side in ("src", "tgt")}
        self.subwords = Subwords.load(self.spm_paths["src"], self.spm_paths["tgt"])
        self.train_split = EncodedSplit.load(spm_dir / "train.npz")
        self.valid_split = EncodedSplit.load(spm_dir / "valid.npz")
        self.valid_refs = read_lines(exp_dir / "data" / "valid.tgt")
        vocab = self.manifest["vocab_size"]
        self.output_vocab = self.manifest.get("output_vocab")  # None: all SentencePiece ids
        if self.output_vocab is not None:
            vocab_ids = np.asarray(self.output_vocab)
            for split in (self.train_split, self.valid_split):
                split.tgt_ids = to_output_ids(split.tgt_ids, vocab_ids, vocab["tgt"])
        output_size = len(self.output_vocab) if self.output_vocab is not None else vocab["tgt"]
        self.model = build_model(config.model, vocab["src"], output_size).to(self.device)
        if t.compile:
            # A decoder step is dozens of small elementwise ops (an update runs ~30,000 of them);
            # fused, they cost less than their calls. Dynamic shapes: the batch size and the
            # source length change with every batch. Validation's greedy steps use it too.
            self.model.decoder.recur = torch.compile(self.model.decoder.recur, dynamic=True)
        self.train_model = self.model  # what the training forward runs: the model or its DDP wrapper
        if self.world.active:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
            torch.manual_seed(t.seed + self.world.rank)  # its own dropout masks on every rank
        # fused: one kernel over all parameters instead of a dozen elementwise passes each
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, betas=tuple(t.betas),
                                          weight_decay=t.weight_decay,
                                          fused=device.type in ("cpu", "cuda"))
        self.scheduler = build_scheduler(config, self.optimizer)
        self.progress = Progress()

    # -- checkpoints ---------------------------------------------------------------------------

    def payload(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "ranks": distributed.gather_objects(self.world, (torch.get_rng_state(), random.getstate()))},
            "progress": asdict(self.progress),
            "config": config_to_dict(self.config),
            "spm": {side: path.read_bytes() for side, path in self.spm_paths.items()},
            "spm_paths": {side: str(path) for side, path in self.spm_paths.items()},
            "vocab_size": {**self.manifest["vocab_size"], "output": self.model.tgt_vocab_size},
            "output_vocab": self.output_vocab,
            "num_parameters": self.model.num_parameters(),
            "versions": versions(),
        }

    def save(self, name: str) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise NmtError(f"parameters became NaN/inf at step {self.progress.step}; {self.out / name} "
                           "keeps the last good state (try a lower train.lr or train.clip_norm)")
        payload = self.payload()  # every rank takes part (its RNG state); rank 0 writes
        if self.world.is_main:
            save_checkpoint(self.out / name, payload)

    def resume(self, path: Path) -> None:
        payload = load_checkpoint(path)
        if payload["config"]["model"] != config_to_dict(self.config)["model"]:
            raise NmtError(
                f"{path}: was trained with a different model section; use another --exp directory "
                "or remove it to start afresh"
            )
        load_state(self.model, payload["model"], path)
        self.optimizer.load_state_dict(payload["optimizer"])
        saved_lr = payload["config"]["train"]["lr"]
        if saved_lr != self.config.train.lr:  # the recipe's lr was changed: the user wants it now
            print(f"train.lr changed from {saved_lr} to {self.config.train.lr}: using the new value")
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

    # -- validation ----------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        total_loss, total_tokens = 0.0, 0
        for indices in token_batches(self.valid_split, self.config.train.batch_tokens, 0, 0, shuffle=False):
            batch = collate(self.valid_split, indices).to(self.device)
            with autocast(self.device, self.precision.name):
                loss, tokens = batch_loss(self.model, batch)
            total_loss += float(loss) * tokens
            total_tokens += tokens
        decode = self.config.decode
        src_seqs = [self.valid_split.src(i).tolist() for i in range(len(self.valid_split))]
        hyps = search_corpus(self.model, src_seqs, self.device, beam_size=1,
                             batch_size=decode.batch_size, max_len_a=decode.max_len_a,
                             max_len_b=decode.max_len_b, precision=self.precision.name)
        vocab = self.output_vocab
        texts = self.subwords.decode_tgt([[vocab[t] for t in h[0].tokens] if vocab else h[0].tokens
                                          for h in hyps])
        self.model.train()
        valid_loss = total_loss / max(1, total_tokens)
        return {"valid_loss": valid_loss, "valid_ppl": math.exp(min(valid_loss, 50.0)),
                "valid_bleu": score(texts, [self.valid_refs])["bleu"]}


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def train(config: Config, exp_dir: Path) -> dict:
    trainer = Trainer(config, exp_dir)
    out = trainer.out
    try:
        if not trainer.world.is_main:
            return _train(trainer, config)
        out.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(out / "train.lock"):
            return _train(trainer, config)
    finally:
        distributed.leave(trainer.world)


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """One `nmt train` per experiment: a lock file holding the owner's pid. A lock whose process
    is gone (killed, machine rebooted) is stale and taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner > 0 and _alive(owner):
                raise NmtError(f"{path}: another `nmt train` (pid {owner}) is training this "
                               "experiment; wait for it or stop it first") from None
            print(f"removing stale lock {path} (pid {owner} is not running)")
            path.unlink(missing_ok=True)
    else:  # pragma: no cover - lost a race twice
        raise NmtError(f"{path}: could not take the training lock")
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _train(trainer: Trainer, config: Config) -> dict:
    out, main = trainer.out, trainer.world.is_main
    summary_path = out / "summary.json"
    metrics_path = out / "metrics.jsonl"
    log = print if main else (lambda *args, **kwargs: None)
    if (out / "last.pt").is_file():
        trainer.resume(out / "last.pt")
        log(f"resuming from {out / 'last.pt'} at step {trainer.progress.step}")
        if main:
            _truncate_metrics(metrics_path, trainer.progress.step)
    elif main:
        metrics_path.unlink(missing_ok=True)
    if main:
        summary_path.unlink(missing_ok=True)  # summary.json marks a finished run (make's target)
        save_config(config, out / "config.yaml")
    world = f", {trainer.world.size} processes" if trainer.world.active else ""
    log(f"model: {trainer.model.num_parameters():,} parameters ({config.model.cell}, "
        f"attention {config.model.attention}); device {trainer.device}, "
        f"{torch.get_num_threads()} threads{world}")

    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signum

    handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open(metrics_path if main else os.devnull, "a", encoding="utf-8") as metrics:
            finished = _epochs(trainer, metrics, stop)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if not finished:
        raise NmtError(f"interrupted at step {trainer.progress.step}; saved {out / 'last.pt'}: "
                       f"run `nmt train {config.name}` again to resume")
    p = trainer.progress
    summary = {
        "steps": p.step, "epochs": p.epoch, "best_valid_bleu": p.best_bleu, "best_step": p.best_step,
        "train_seconds": p.train_seconds, "wall_seconds": p.wall_seconds, "target_tokens": p.tokens,
        "tokens_per_second": p.tokens / max(p.train_seconds, 1e-9),
        "num_parameters": trainer.model.num_parameters(), "processes": trainer.world.size,
        "precision": trainer.precision.record(), "machine": machine(),
        "config": config_to_dict(config), "versions": versions(),
    }
    if main:
        write_json(summary_path, summary)
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint we resume from: they will be redone."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _epochs(trainer: Trainer, metrics, stop: dict) -> bool:
    """Train until max_epochs/max_steps/early stopping (True) or a stop signal (False).

    Under torchrun, rank r trains on batches[i + r] of every group of world-size batches; a group
    is one update, and batch_in_epoch counts the batches of all ranks.
    """
    t, p, world = trainer.config.train, trainer.progress, trainer.world
    model, optimizer = trainer.train_model, trainer.optimizer
    model.train()
    window_loss, window_tokens, window_seconds = 0.0, 0, 0.0
    bad_steps = 0  # consecutive batches with a non-finite loss or gradient
    loop_start, wall_before = time.perf_counter(), p.wall_seconds

    def update_wall() -> float:
        p.wall_seconds = wall_before + time.perf_counter() - loop_start
        return p.wall_seconds

    def out_of_budget() -> bool:
        update_wall()
        return bool((t.max_steps and p.step >= t.max_steps)
                    or (t.max_minutes and p.wall_seconds >= 60 * t.max_minutes))

    # A resumed run that had already stopped early or used up its budget stays stopped.
    done = bool(t.patience > 0 and p.bad_validations >= t.patience) or out_of_budget()
    while p.epoch < t.max_epochs and not done:
        batches = token_batches(trainer.train_split, t.batch_tokens, t.seed, p.epoch, t.max_len)
        usable = len(batches) - len(batches) % world.size  # every rank takes the same number
        bar = tqdm(total=usable, initial=p.batch_in_epoch, desc=f"epoch {p.epoch + 1}", unit="batch",
                   dynamic_ncols=True, leave=False, disable=not world.is_main)
        stopping = False
        while p.batch_in_epoch < usable:
            started = time.perf_counter()
            batch = collate(trainer.train_split, batches[p.batch_in_epoch + world.rank]).to(trainer.device)
            with autocast(trainer.device, trainer.precision.name):
                loss, tokens = batch_loss(model, batch, t.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP, this also averages the gradients over the ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), t.clip_norm or math.inf)
            finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
            # One all-reduce agrees on tokens, NaNs, stop requests and the time budget, so that
            # all ranks take the same decisions.
            over_time = bool(t.max_minutes and update_wall() >= 60 * t.max_minutes)
            all_tokens, non_finite, stops, over_time = distributed.sum_over_ranks(
                world, [tokens, int(not finite), int(stop["signal"] is not None), int(over_time)],
                trainer.device)
            stopping = stops > 0
            p.batch_in_epoch += world.size
            if non_finite:
                # Skip the update (the parameters stay as they were), move on to the next batch.
                bad_steps += 1
                if world.is_main:
                    tqdm.write(f"warning: step {p.step + 1}: loss {float(loss.detach()):.4g}, gradient "
                               f"norm {float(grad_norm):.4g}; update skipped ({bad_steps} in a row)")
                if bad_steps >= MAX_BAD_STEPS:
                    raise NmtError(
                        f"loss or gradients were NaN/inf for {bad_steps} batches in a row at step "
                        f"{p.step}; stopped without saving them: {trainer.out / 'last.pt'} holds the "
                        "last good state (try a lower train.lr or train.clip_norm)")
                if not stopping:
                    continue
            else:
                bad_steps = 0
                optimizer.step()
                if t.schedule == "warmup":
                    trainer.scheduler.step()
                p.step += 1
                p.tokens += all_tokens
                step_seconds = time.perf_counter() - started
                p.train_seconds += step_seconds
                window_seconds += step_seconds
                window_loss += float(loss.detach()) * tokens
                window_tokens += tokens
                bar.update(world.size)
                lr = optimizer.param_groups[0]["lr"]
                if p.step % LOG_EVERY == 0:
                    # loss of this rank's batches; tokens/s of all ranks together
                    record = {"step": p.step, "epoch": p.epoch + 1, "train_loss": window_loss / window_tokens,
                              "lr": lr, "tokens_per_s": window_tokens * world.size / window_seconds,
                              "elapsed": p.train_seconds, "wall": update_wall()}
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    lr=f"{lr:.2g}", step=p.step)
                    window_loss, window_tokens, window_seconds = 0.0, 0, 0.0
                if p.step % t.valid_every == 0:
                    done = _validate(trainer, metrics)
                done = done or bool(over_time) or bool(t.max_steps and p.step >= t.max_steps)
            if p.step % t.checkpoint_every == 0 or done or stopping:
                trainer.save("last.pt")
            if done or stopping:
                break
        bar.close()
        if stopping:
            return False
        if p.batch_in_epoch >= usable:
            p.epoch += 1
            p.batch_in_epoch = 0
    if p.validated_step != p.step:  # the last updates were not validated yet
        _validate(trainer, metrics)
    trainer.save("last.pt")
    return True


def _validate(trainer: Trainer, metrics) -> bool:
    """Validate on rank 0 and broadcast its BLEU, so every rank keeps best.pt bookkeeping, the
    plateau schedule and early stopping alike; True when early stopping says stop."""
    t, p, world = trainer.config.train, trainer.progress, trainer.world
    started = time.perf_counter()
    result = trainer.validate() if world.is_main else None
    bleu = distributed.broadcast_float(world, result["valid_bleu"] if result else 0.0, trainer.device)
    p.validated_step = p.step
    improved = bleu > p.best_bleu
    if improved:
        p.best_bleu, p.best_step, p.bad_validations = bleu, p.step, 0
    else:
        p.bad_validations += 1
    if isinstance(trainer.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        trainer.scheduler.step(bleu)
    if improved:
        trainer.save("best.pt")
    if world.is_main:
        lr = trainer.optimizer.param_groups[0]["lr"]
        record = {"step": p.step, "epoch": p.epoch + 1, **result, "lr": lr, "elapsed": p.train_seconds,
                  "wall": p.wall_seconds, "valid_seconds": time.perf_counter() - started}
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        tqdm.write(f"step {p.step}: valid loss {result['valid_loss']:.3f} ppl {result['valid_ppl']:.1f} "
                   f"BLEU {result['valid_bleu']:.2f}{' (best)' if improved else ''} lr {lr:.2g}")
    return t.patience > 0 and p.bad_validations >= t.patience
