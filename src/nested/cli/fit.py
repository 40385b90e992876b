"""``nested fit`` and ``nested validate``: a LightningCLI over the training module and the DataModule.

Several ``--config`` files compose (later ones win), ``--print_config`` shows the merged result, and an
unknown key or a wrong type fails naming the key. ``nested fit`` is preemption-safe by default
(:mod:`nested.training.resume`): checkpoints are written atomically, SIGUSR1/SIGTERM/SIGINT checkpoint at the
next step (and SIGUSR1 requeues under SLURM), checkpoint callbacks without a ``dirpath`` write to
``<default_root_dir>/checkpoints``, and without ``--ckpt_path`` a run resumes from the newest checkpoint of
its ``default_root_dir`` (``--auto_resume=false`` refuses a root that holds checkpoints); a requeued SLURM job
goes on from the newest checkpoint of its root whatever its ``--ckpt_path``. ``nested validate`` validates
``--ckpt_path``, else the newest checkpoint of its ``default_root_dir``.

Steps whose gradients are not finite are skipped, and a run of them stops the fit
(:class:`~nested.callbacks.DivergenceGuard`).

Exit status: 0 when training reached its end (``adapters/last`` written), :data:`EXIT_STOPPED_EARLY` (75)
when a stop signal ended it earlier with a checkpoint to resume from, 2 for a user mistake or a diverged
run, 128 + the signal number when a second stop signal ended it at once.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
import signal
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    LRSchedulerTypeTuple,
    SaveConfigCallback,
)
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_registry import _is_registry

from nested.callbacks.divergence import DivergenceGuard
from nested.callbacks.export import AdapterExport, stopped_early
from nested.callbacks.progress_log import ProgressLog
from nested.cli.common import check_creatable_folder
from nested.data.datamodule import NestedDataModule
from nested.data.loading import end_loader_workers
from nested.errors import NestedUserError, UsageError
from nested.files import write_text_atomic
from nested.library_messages import quiet_training_notices
from nested.signals import clear_signals, install_signal_flags, restore_signal_handlers
from nested.training.loggers import LOGGED_RUN_KEY, TensorBoardLogger, continued_logger
from nested.training.module import NestedAttentionModule
from nested.training.resume import (
    AtomicCheckpointIO,
    PreemptionCheckpoint,
    checkpoint_dirs,
    checkpoint_step,
    drop_replaced_checkpoint_callbacks,
    find_resume_checkpoint,
    hpc_checkpoints,
    remove_killed_writes,
    stable_checkpoint_dirs,
)

__all__ = ["EXIT_STOPPED_EARLY", "NestedCLI", "configured_run", "main_fit"]

# How long before a run's start a checkpoint write's temporary file must have last changed for the run to delete
# it as the remains of a killed write: NFS and Lustre clients cache file times for up to a minute, and nodes'
# clocks differ; a remain left by a requeue's kill is deleted by a later start.
KILLED_WRITE_AGE = 15 * 60
# sysexits.h's EX_TEMPFAIL, "try again later": the run stopped early and resumes when run again. Not 1 (a
# crash), 2 (a user mistake) or 128 + n (killed by signal n), so scripts and SLURM jobs can tell it apart.
EXIT_STOPPED_EARLY = 75
# `--data.domains.0.urls=...`: a list element picked by its index, which jsonargparse has no syntax for.
_INDEXED_OPTION = re.compile(r"^--((?:[A-Za-z_]\w*\.)+?)(\d+)((?:\.\w+)+)(?:=|$)")


class NestedArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose configuration mistakes end in one line and exit code 2: the error and where
    the options are listed, without the hundred lines of usage that jsonargparse prints before them.

    Attributes:
        command: the command the line names (``nested fit``), whichever of its parsers found the mistake.
        options_command: the command whose ``--help`` lists the options (``nested fit`` for ``nested prompts``).
    """

    command = "nested fit"
    options_command = "nested fit"

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a parser inside jsonargparse, which catches the ArgumentError it raises
            super().error(message, ex)
        sys.stderr.write(
            f"{self.command}: error: {config_error_line(message)} ({self.options_command} --help lists the "
            "options)\n"
        )
        self.exit(2)


def config_error_line(message: str) -> str:
    """A jsonargparse error on one line. It lists a value's failed alternatives as indented "- " lines; here they
    become "; "-separated, and a line ending in ":" runs on into the next."""
    parts = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip()]
    text = parts[0] if parts else message
    for previous, part in itertools.pairwise(parts):
        text += (" " if previous.endswith(":") else "; ") + part
    return text


class SaveConfigAfterRestore(SaveConfigCallback):
    """Writes the run's ``config.yaml`` (in the logger's folder), atomically, once the checkpoint the run resumes
    from has been accepted: a resume refused for another configuration leaves the one the run was trained with.
    LightningCLI's own writes it at setup, before the checkpoint loads."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # nested validate; in fit, the sanity check also comes after the checkpoint's restore
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # broadcast from rank 0: every rank calls it
        if trainer.is_global_zero and log_dir is not None:
            text = self.parser.dump(self.config, skip_none=False)
            write_text_atomic(Path(log_dir) / self.config_filename, text)
        self.already_saved = True


class NestedCLI(LightningCLI):
    """LightningCLI with the adapter export, preemption handling, divergence guard and progress lines always on, and
    auto-resume."""

    def __init__(
        self, *args: Any, command: str = "nested fit", options_command: str | None = None, **kwargs: Any
    ):
        """``command``: the command a configuration mistake is reported for; ``options_command``: the one whose
        ``--help`` lists the options (default ``command``)."""
        self._commands = command, options_command or command
        self._rotated_ckpt_path: str | None = None  # a requeued job's --ckpt_path that no longer exists
        self._started = time.time()  # a checkpoint write left from before then is not this run's
        self._default_logger = False  # the trainer logs with nested's TensorBoardLogger, set up here
        super().__init__(*args, parser_class=NestedArgumentParser, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.command, parser.options_command = self._commands
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The optimizer and scheduler sections go to the module, which builds them over the adapter's parameters
        # when training starts (LightningCLI's own would build them now, before the adapter exists).
        parser.add_optimizer_args((torch.optim.Optimizer,), link_to="model.optimizer")
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple, link_to="model.lr_scheduler")
        parser.add_lightning_class_args(AdapterExport, "export")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_lightning_class_args(ProgressLog, "progress_log")
        parser.add_argument(
            "--auto_resume",
            type=bool,
            default=True,
            help="fit without --ckpt_path: resume from the newest checkpoint of default_root_dir (hpc_ckpt_*.ckpt, "
            "<checkpoint dirpath>/*.ckpt) if there is one; false: start fresh, refusing a root that holds "
            "checkpoints (a requeued SLURM job resumes whatever this says). validate without --ckpt_path: "
            "validate that newest checkpoint, refusing a root without one; false: the untrained adapter (in a root "
            "without checkpoints).",
        )

    @staticmethod
    def link_optimizers_and_lr_schedulers(parser: LightningArgumentParser) -> None:
        """Link the ``optimizer`` / ``lr_scheduler`` sections to the module as plain dicts (class_path, init_args)."""
        for key, (_, link_to) in {**parser._optimizers, **parser._lr_schedulers}.items():
            if link_to != "AUTOMATIC":
                parser.link_arguments(key, link_to, compute_fn=_plain)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            # jsonargparse reports a class it could not build (a callback in trainer.callbacks' union of types)
            # as a ValueError over every alternative it tried, raised from the first one's error: a mistake our
            # code named is shown as such.
            cause = _user_error_cause(error)
            if cause is None:
                raise
            raise cause from None

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        config = self.config[self.subcommand] if self.subcommand else self.config  # None: configured_run
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as error:  # Lightning's type for trainer settings it refuses
            raise UsageError(_trainer_misconfiguration(error, config.trainer)) from error
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user-chosen one is kept
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        default = config.trainer.logger is True or config.trainer.logger is None
        if default and [type(logger) for logger in trainer.loggers] == [LightningTensorBoardLogger]:
            # Lightning's default logger, built as Lightning builds it; a user-chosen one is kept, and so are
            # none (barebones) and fast_dev_run's stand-in
            trainer.loggers = [
                TensorBoardLogger(save_dir=trainer.default_root_dir, version=SLURMEnvironment.job_id())
            ]
            self._default_logger = True
        stable_checkpoint_dirs(trainer)
        for replaced in drop_replaced_checkpoint_callbacks(trainer):
            rank_zero_info(
                f"nested: a ModelCheckpoint configured later for {replaced.dirpath} replaces the earlier one "
                f"(save_top_k {replaced.save_top_k}): one callback writes that folder's last.ckpt"
            )
        if self.subcommand is not None:  # a run, not a configuration read by another command (configured_run)
            check_output_folders(trainer)
        return trainer

    def _parse_ckpt_path(self) -> None:
        # An explicit --ckpt_path that is not a readable checkpoint is refused in one line, before anything
        # runs. Lightning's own step here is left out: it writes the checkpoint's hyper-parameters over the
        # configured model, so a checkpoint of another base model or encoder would train on as that model
        # instead of being refused (a resume checks the two against each other when the checkpoint loads).
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        local = path is not None and _is_local_file_protocol(str(path)) and not _is_registry(path)
        if local and path not in ("last", "hpc", "best"):
            if subcommand == "fit" and requeued_job() and not Path(path).exists():
                # A requeued job goes on from the newest checkpoint of its root (before_fit); the one its first
                # run started from may have been rotated away since (PreemptionCheckpoint keeps the newest).
                self.config[subcommand]["ckpt_path"] = None
                self._rotated_ckpt_path = path
            else:
                check_checkpoint_path(path)

    def before_fit(self) -> None:
        self._choose_fit_checkpoint()
        self._continue_logged_run()
        self._skip_init_adapter_if_a_checkpoint_loads()

    def before_validate(self) -> None:
        self._choose_validation_checkpoint()
        self._skip_init_adapter_if_a_checkpoint_loads()

    def _skip_init_adapter_if_a_checkpoint_loads(self) -> None:
        """``model.init_adapter`` only starts a run: where a checkpoint's weights replace it, it is not read
        (it may have been moved since, or its Hub be out of reach on a compute node)."""
        loads = self.config_init[self.subcommand].get("ckpt_path") is not None
        if loads and getattr(self.model, "init_adapter", None) is not None:
            self.model.init_adapter = None

    def _choose_fit_checkpoint(self) -> None:
        """Which checkpoint the run starts from: ``--ckpt_path``, else the newest under the root
        (``--auto_resume``); a requeued SLURM job always goes on from its newest one."""
        config = self.config_init[self.subcommand]
        check_validation_interval(self.trainer, self.datamodule)
        root = self.trainer.default_root_dir
        if self.trainer.is_global_zero:
            for partial in remove_killed_writes(
                [root, *checkpoint_dirs(self.trainer)], self._started - KILLED_WRITE_AGE
            ):
                rank_zero_info(
                    f"nested: removed {partial}, the remains of a checkpoint write that was killed"
                )
        given = config.get("ckpt_path")
        given_step = _given_step(given)
        newest = find_resume_checkpoint(root, checkpoint_dirs(self.trainer))
        newest_step = -1 if newest is None else checkpoint_step(newest)
        if newest is not None and requeued_job() and given_step <= newest_step:
            # The job's arguments are those of its first run, which they chose the start of; the checkpoints
            # under its root are its own, written before it was requeued.
            config["ckpt_path"] = str(newest)
            rank_zero_info(
                f"nested: requeued job (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}): resuming "
                f"from {newest}, the newest checkpoint of its folders"
                + (f", not --ckpt_path {given}" if given is not None and str(given) != str(newest) else "")
            )
            return
        if self._rotated_ckpt_path is not None:  # requeued, with nothing under its root to go on from
            raise UsageError(f"--ckpt_path {self._rotated_ckpt_path}: no such file; {_CHECKPOINT_FIX}")
        if given is not None:
            if given_step < newest_step:
                # A roll-back in place: its checkpoints would mix with the newer ones, and the next resume (a
                # requeue, or the same command without --ckpt_path) would go on from those.
                raise UsageError(
                    f"--ckpt_path {given} (step {given_step}) is older than {newest} (step {newest_step}) of this "
                    f"run's folders; to go on from it, {_start_over(newest, root)} (the checkpoint can stay where "
                    "it is)"
                )
            return
        if not config.get("auto_resume", True):
            if newest is not None:
                # Started here, a new run's checkpoints would mix with the old run's, and the next automatic
                # resume would take whichever has the higher step.
                raise UsageError(
                    f"--auto_resume=false: {newest} (step {newest_step}) is a checkpoint of an earlier "
                    f"run; to start over, {_start_over(newest, root)} (or move it away); to resume, leave "
                    "--auto_resume=false out"
                )
            return
        if newest is not None:
            config["ckpt_path"] = str(newest)
            rank_zero_info(
                f"nested: resuming from {newest}, the newest checkpoint of this run's folders; to start over, "
                f"{_start_over(newest, root)}."
            )

    def _continue_logged_run(self) -> None:
        """A run resumed from a checkpoint of its own folders logs on to the TensorBoard folder it logged to (the
        default logger names a new one per start, or one per SLURM job). A checkpoint from elsewhere starts a
        folder of its own."""
        if not self._default_logger:
            return
        root, dirs = Path(self.trainer.default_root_dir), checkpoint_dirs(self.trainer)
        path = self.config_init[self.subcommand].get("ckpt_path")
        if path == "hpc":
            path = next(reversed(hpc_checkpoints(root)), None)
        elif path == "last":  # Lightning's choice: the newest last*.ckpt of the checkpoint folders
            found = [file for folder in dirs if folder.is_dir() for file in folder.glob("last*.ckpt")]
            path = max(found, key=lambda file: file.stat().st_mtime, default=None)
        if path is None or not Path(path).is_file():
            return
        if Path(path).resolve().parent not in {folder.resolve() for folder in [root, *dirs]}:
            return
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        logger = continued_logger(root, checkpoint.get(LOGGED_RUN_KEY))
        if logger is not None:
            self.trainer.loggers = [logger]
            rank_zero_info(f"nested: logging to {logger.log_dir}, as the run this checkpoint comes from did")

    def _choose_validation_checkpoint(self) -> None:
        """Which checkpoint is validated: ``--ckpt_path``, else the newest of the run's folders. A run that would
        validate the freshly initialised adapter by mistake is refused: no checkpoint to go by, or a keyword
        (``last``, ``hpc``) that Lightning finds nothing for. ``--auto_resume=false`` validates the untrained
        adapter, in a root without checkpoints (under SLURM, Lightning would load the root's hpc ones)."""
        config = self.config_init[self.subcommand]
        given = config.get("ckpt_path")
        root, dirs = self.trainer.default_root_dir, checkpoint_dirs(self.trainer)
        searched = f"{root} (hpc_ckpt_*.ckpt)" + "".join(f", {folder} (*.ckpt)" for folder in dirs)
        if given in ("last", "hpc"):
            folders = [Path(root)] if given == "hpc" else [Path(folder) for folder in dirs]
            pattern = "hpc_ckpt_*.ckpt" if given == "hpc" else "last*.ckpt"
            if not any(folder.is_dir() and any(folder.glob(pattern)) for folder in folders):
                raise UsageError(
                    f"--ckpt_path={given}: no {pattern} in {', '.join(map(str, folders)) or 'any checkpoint folder'}; "
                    "pass a checkpoint's path, or leave --ckpt_path out to validate the newest checkpoint of "
                    "the run's folders"
                )
            return
        if given is not None:
            return
        newest = find_resume_checkpoint(root, dirs)
        if not config.get("auto_resume", True):
            if newest is not None:
                raise UsageError(
                    f"--auto_resume=false validates the untrained adapter, but {searched} hold checkpoints, "
                    f"{newest} the newest: pass another --trainer.default_root_dir"
                )
            return
        if newest is None:
            raise UsageError(
                f"no checkpoint to validate in {searched}: pass --ckpt_path=CHECKPOINT or the run's "
                "--trainer.default_root_dir; --auto_resume=false validates the untrained adapter"
            )
        config["ckpt_path"] = str(newest)
        rank_zero_info(f"nested: validating {newest}, the newest checkpoint of this run's folders")


def _user_error_cause(error: BaseException) -> NestedUserError | None:
    """The first :class:`NestedUserError` among ``error``'s explicit causes, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, NestedUserError):
            return error
        error = error.__cause__
    return None


def _trainer_misconfiguration(error: MisconfigurationException, trainer: Namespace) -> str:
    message = " ".join(str(error).split())
    if str(trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        return (
            f"--trainer.accelerator={trainer.accelerator}, but torch sees no GPU here (torch "
            f"{torch.__version__}, torch.cuda.is_available() is false); run on a GPU node, or pass "
            "--trainer.accelerator=cpu (slow; with --trainer.precision=32-true or bf16-mixed)"
        )
    return f"Lightning refuses the trainer settings: {message}"


def _start_over(checkpoint: Path, root: str) -> str:
    """How to start a run that will not find ``checkpoint``: another root, and another ModelCheckpoint dirpath
    where the checkpoint lies outside the root."""
    if checkpoint.resolve().is_relative_to(Path(root).resolve()):
        return "pass another --trainer.default_root_dir"
    return f"pass another --trainer.default_root_dir and another ModelCheckpoint dirpath than {checkpoint.parent}"


def requeued_job() -> bool:
    """Whether this process belongs to a SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0)."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return count.isdigit() and int(count) > 0 and SLURMEnvironment.detect()


def _given_step(path: Any) -> int | float:
    """The step inside a local ``--ckpt_path`` file; -1 for none; infinity for a keyword ("last", "hpc") or a
    remote path, which the newest checkpoint neither replaces nor is compared with."""
    if path is None:
        return -1
    if not Path(str(path)).is_file():
        return float("inf")
    return checkpoint_step(path)


def check_output_folders(trainer: L.Trainer) -> None:
    """Refuse, before the models load, a folder the run writes to that cannot be created: the root, the
    checkpoint callbacks' folders and the adapter exports' (else the run would fail at its first checkpoint)."""
    folders = [("--trainer.default_root_dir", Path(trainer.default_root_dir))]
    folders += [("the ModelCheckpoint dirpath", path) for path in checkpoint_dirs(trainer)]
    folders += [
        ("the AdapterExport dirpath", callback.export_root(trainer))
        for callback in trainer.callbacks
        if isinstance(callback, AdapterExport)
    ]
    for option, folder in folders:
        check_creatable_folder(folder, option)


def check_validation_interval(trainer: L.Trainer, datamodule: Any) -> None:
    """Refuse, in one line, an integer ``trainer.val_check_interval`` longer than an epoch of the training stream
    (Lightning refuses it with a traceback once the fit has started; it counts within an epoch)."""
    # A time (a str, dict or timedelta) is Lightning's _val_check_time_interval; it sets no val_check_interval.
    interval = getattr(trainer, "val_check_interval", None)
    if (
        not isinstance(interval, int)
        or trainer.check_val_every_n_epoch is None
        or trainer.limit_val_batches == 0
        or trainer.limit_train_batches != 1.0
        or not isinstance(datamodule, NestedDataModule)
    ):
        return
    batches = datamodule.epoch_batches(trainer.world_size)
    if interval > batches:
        raise UsageError(
            f"--trainer.val_check_interval={interval} is more than the {batches} batches of an epoch "
            f"(data.epoch_samples={datamodule.epoch_samples} over {trainer.world_size} rank(s), batches of "
            f"{datamodule.batch_size}): lower it, raise data.epoch_samples, or pass "
            "--trainer.check_val_every_n_epoch=null to count it over the whole run (without validation: "
            "--trainer.limit_val_batches=0)"
        )


def check_checkpoint_path(path: str) -> None:
    """Refuse a ``--ckpt_path`` that is missing or is not a readable checkpoint, in one line (its step is read
    without loading its tensors)."""
    try:
        checkpoint_step(path)
    except FileNotFoundError as error:
        raise UsageError(f"--ckpt_path {path}: no such file; {_CHECKPOINT_FIX}") from error
    except (KeyError, TypeError, IndexError) as error:  # it loads, but holds no global_step
        raise UsageError(
            f"--ckpt_path {path} is not a Lightning checkpoint (no global_step); {_CHECKPOINT_FIX}"
        ) from error
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        # What torch.load raises for a file that is not a whole checkpoint, by kind of damage. Its message for a
        # file that is no zip archive at all tells the user to save it again with torch.save.
        if not zipfile.is_zipfile(path):
            detail = "not the zip archive torch.save writes: another kind of file, or one cut short"
        else:
            detail = " ".join(str(error).split()) or type(error).__name__
        raise UsageError(
            f"--ckpt_path {path} is not a readable checkpoint ({detail}); {_CHECKPOINT_FIX}"
        ) from error


_CHECKPOINT_FIX = (
    "pass a checkpoint nested fit wrote (checkpoints/*.ckpt, hpc_ckpt_*.ckpt), or leave --ckpt_path out to "
    "resume from the newest readable one under trainer.default_root_dir"
)


def _plain(value: Any) -> Any:
    """A linked section as plain data: dicts and lists (a tuple would not survive the saved config.yaml)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def check_list_indexes(argv: list[str]) -> None:
    """Refuse ``--data.domains.0.urls=...``: jsonargparse cannot pick a list element by its index (it would
    fail with "unrecognized arguments: --0.urls"); say what works instead."""
    for arg in argv:
        match = _INDEXED_OPTION.match(arg)
        if match:
            key, index, field = match.group(1).rstrip("."), match.group(2), match.group(3).lstrip(".")
            raise UsageError(
                f"{arg.partition('=')[0]}: a list element cannot be chosen by its index ({index}) on the command "
                f"line: --{key}.{field}=... sets {field} in the LAST element of {key} (with one element, that "
                f"one); to change another element, give the whole list (--{key}='[{{...}}, ...]') or put it in "
                "one more --config file."
            )


def check_config_files(argv: list[str]) -> None:
    """Refuse a ``--config`` / ``-c`` file that is not YAML, naming it: jsonargparse's own message names no
    file, and a run composes several. Only syntax is checked here; what a value means is jsonargparse's."""
    given = [b for a, b in itertools.pairwise(argv) if a in ("--config", "-c")]
    given += [arg.partition("=")[2] for arg in argv if arg.startswith(("--config=", "-c="))]
    for text in given:
        try:
            path = Path(text)
            if not path.is_file():
                continue  # missing, or YAML text itself: jsonargparse's to report
        except OSError:  # YAML text longer than a file name may be
            continue
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise UsageError(
                f"--config {path} is not UTF-8 text ({error.reason}); give a YAML file"
            ) from error
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise UsageError(f"--config {path} is not valid YAML: {problem}{at}") from error
        except Exception:  # a value PyYAML's safe loader builds and jsonargparse's reads as text (a date)
            continue


# What a configuration read by another command (nested prompts) runs on: it builds no trainer for a GPU
# cluster, only the module, DataModule and callbacks it describes.
_LOCAL_TRAINER = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.num_nodes=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
    "--trainer.logger=false",
]


def configured_run(argv: list[str]) -> NestedCLI:
    """The module, DataModule and trainer callbacks that ``nested fit ARGV`` would build, built but not run
    (``cli.model``, ``cli.datamodule``, ``cli.trainer.callbacks``); the trainer itself is a local one. The
    model's weights are not loaded: the module loads them in ``configure_model``."""
    check_list_indexes(argv)
    check_config_files(argv)
    with warnings.catch_warnings():
        # It warns whenever sys.argv has arguments besides args: here they are another command's.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return NestedCLI(
            NestedAttentionModule,
            NestedDataModule,
            args=[*argv, *_LOCAL_TRAINER],
            run=False,
            save_config_callback=None,
            parser_kwargs={"allow_abbrev": False},
            command="nested prompts",
            options_command="nested fit",
        )


def main_fit(command: str, argv: list[str] | None) -> int:
    """``nested fit|validate ARGS``; ``argv`` None: LightningCLI reads ``sys.argv`` itself (it warns when given
    both). Returns the exit status (module docstring)."""
    check_list_indexes(sys.argv[2:] if argv is None else argv)
    check_config_files(sys.argv[2:] if argv is None else argv)
    quiet_training_notices()
    # From now on SIGUSR1/SIGTERM/SIGINT only set a flag, acted on at a step end (PreemptionCheckpoint).
    clear_signals()
    previous = install_signal_flags() if command == "fit" else {}
    try:
        cli = NestedCLI(
            NestedAttentionModule,
            NestedDataModule,
            args=None if argv is None else [command, *argv],
            save_config_callback=SaveConfigAfterRestore,
            save_config_kwargs={"overwrite": True},
            # No prefix matching: a mistyped --model.learning_rat must fail, not set learning_rate.
            parser_kwargs={name: {"allow_abbrev": False} for name in ("fit", "validate")}
            | {"allow_abbrev": False, "prog": "nested"},
            command=f"nested {command}",
        )
    except BaseException:
        end_loader_workers()
        raise
    finally:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
            # Set by PreemptionCheckpoint once it requeued the SLURM job, whose SIGTERM must not cut this exit.
            previous.pop(signal.SIGTERM, None)
        restore_signal_handlers(previous)
    trainer = cli.trainer
    # Global rank 0 only: the others exit 0, so that `srun --kill-on-bad-exit` never ends rank 0 while it still
    # writes the adapter or uploads it (srun's own exit status is the highest of its tasks').
    if command == "fit" and stopped_early(trainer) and trainer.is_global_zero:
        config = cli.config["fit"]
        # Run again as it was, the command would start from the same --ckpt_path, or refuse the root it left.
        chosen = [
            option
            for option, given in (
                ("--ckpt_path", config.get("ckpt_path") is not None or cli._rotated_ckpt_path is not None),
                ("--auto_resume=false", not config.get("auto_resume", True)),
            )
            if given
        ]
        again = (
            f"Run the command again without {' and '.join(chosen)}"
            if chosen
            else "Run the same command again"
        )
        print(
            f"nested fit: stopped at step {trainer.global_step}, before the end of training; exit status "
            f"{EXIT_STOPPED_EARLY}. {again} to resume.",
            file=sys.stderr,
        )
        return EXIT_STOPPED_EARLY
    return 0
