"""The project's one entry point: ``python -m src.cli fit|validate|test|predict``.

    python -m src.cli fit --config configs/mnist1d_resnet_bn.yaml
    python -m src.cli fit --config configs/mnist1d_resnet_bn.yaml --ckpt_path=last      # resume
    python -m src.cli test --ckpt_path lightning_logs/mnist1d_resnet_bn/version_0/checkpoints/last.ckpt
    python -m src.cli fit --config <yaml> --print_config    |    python -m src.cli fit --help

Any setting can be overridden on the command line (``--trainer.max_epochs=5``,
``--model.init_args.hidden_size=256``). LightningCLI in subclass mode over the project's model and
data base classes; what the project adds to it is in :mod:`src.runtime.lightning_cli`. Expected failures
end with ``error: <what to do>`` and an exit status (:mod:`src.runtime.errors`: 2 bad input, 1 a
failure while running, 143/130 stopped by SIGTERM/SIGINT), without a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
import warnings

from src.runtime.startup import fast_exit, heavy_imports

with heavy_imports():  # torch and Lightning: see src/runtime/startup.py
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import src.callbacks  # noqa: F401  (registers the callbacks' short names for YAML)
    from src.data import ClassificationDataModule
    from src.models import ClassifierModule
    from src.runtime.checkpoints import with_stored_config
    from src.runtime.devices import cpu_threads
    from src.runtime.errors import Interrupted, UsageError, exit_on_error
    from src.runtime.hparams import HParamsTab
    from src.runtime.lightning_cli import ClassifierCLI
    from src.runtime.provenance import RunProvenance
    from src.runtime.resume import ResumedRun
    from src.runtime.run_config import RunConfig
    from src.runtime.run_state import RunState, StopNow
    from src.runtime.scaling import ScalingReport
    from src.runtime.summary import RunSummary


class _NoAdverts(logging.Filter):
    """Drop Lightning's tips that advertise cloud services at the start of every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def main(args: list[str] | None = None, run: bool = True) -> ClassifierCLI:
    """Build and run the CLI; ``args`` lets tests and scripts call it in-process."""
    torch.set_num_threads(cpu_threads())
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    # Lightning 2.6 calls a torch pytree API that torch deprecated: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Under bf16-mixed the model summary sizes the parameters at 32 bits and warns that it does; they
    # are float32 under autocast, so its figure is right and the warning is nothing to act on.
    warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary")
    given = list(sys.argv[1:] if args is None else args)
    state = RunState(command=given)
    with exit_on_error(cleanup=lambda _: state.discard_unused()), state.stop_signals():
        try:
            argv = with_stored_config(given)
            if args is None:
                sys.argv[1:] = argv  # LightningCLI parses the command line itself
            cli = ClassifierCLI(
                ClassifierModule,
                ClassificationDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=RunConfig,
                save_config_kwargs={"overwrite": True},
                trainer_defaults={
                    "sync_batchnorm": True,
                    "enable_autolog_hparams": False,  # HParamsTab logs them, with the metrics
                    "callbacks": [ScalingReport(), HParamsTab(), RunSummary(), ResumedRun(), RunProvenance()],
                },
                auto_configure_optimizers=False,
                args=None if args is None else argv,
                run=run,
                run_state=state,
            )
        except MisconfigurationException as err:
            raise UsageError(str(err)) from err
        except StopNow as stop:
            raise Interrupted(stop.signum, stop.message or _stopped(stop.signum, state)) from None
        except SIGTERMException:  # Lightning's own handler saw it first (between its stages)
            raise Interrupted(signal.SIGTERM, _stopped(signal.SIGTERM, state)) from None
        finally:
            if run:
                state.release()
        if run and state.stop_signal is not None:
            raise Interrupted(
                state.stop_signal,
                f"{signal.Signals(state.stop_signal).name} arrived as the command finished: it ran to "
                "the end and its results are complete.",
            )
    return cli


def _stopped(signum: int, state: RunState) -> str:
    """What a stop outside a running stage leaves: before the run started, nothing."""
    name = signal.Signals(signum).name
    if state.stop_at_once:
        return (
            f"Stopped by {name} before the run started: nothing was run. Run it again: {state.command_line()}"
        )
    if state.command[:1] == ["fit"]:
        return f"Stopped by {name}; what was saved is intact. Resume with: {state.command_line(ckpt_path='last')}"
    return f"Stopped by {name}; nothing was reported. Run it again: {state.command_line()}"


if __name__ == "__main__":
    with fast_exit():
        main()
