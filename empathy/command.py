"""The run protocol: what every command that writes into an output folder does
before its first write, in one place (`Command`).

    plan = options.Plan(outputs=[(model_dir, "--model_dir")], data=train_set, trains=True,
                        options=options.RunOptions.from_args(args, settings))
    with command.Command(args, plan, model_dir, runs=settings.seed_runs(model_dir)) as run:
        ...  # train and write, holding model_dir; `run` knows which runs resume

Entering it, in this order:

 1. the fresh check of the run folders `runs`: each starts afresh, or continues
    from its last.save (--resume), or is replaced (--overwrite); else refused
    (layout.check_fresh_runs);
 2. every check before writing (options.check_before_writing), with the runs that
    resume checked against the data and flags, then the command's own `checks`;
 3. the output folder taken (layout.owned): a second run into it is refused;
 4. the fresh check again, now that no other run can start there: one may have
    finished meanwhile;
 5. the run record, args.json (or `record`), written in the output folder.

So every refusal comes before the first write. The ledger row is not written here
but by ledger.run_cli once `main` has returned, after every output: a run that fails
after its block (train.py evaluates its seeds after it) appends nothing, and
compare_options.py, which calls the scripts' `main`, appends its own rows.
"""
import contextlib
from dataclasses import replace
from pathlib import Path

from . import layout, options


class Command:
    """The protocol above for one command: `args` its parsed flags, `plan` what it
    is about to do (options.Plan; its RunOptions get the resumes here), `folder`
    the output folder it holds while the block runs. `runs`: (settings of one
    seed, its folder) of every run it trains, as TrainingSettings.seed_runs gives
    them (none for a command that only evaluates). `record`: the run record's name
    in `folder` (None: none). `checks`: functions of `resumes` ({run folder: whether
    it continues from its last.save}) run after check_before_writing. The block
    gets the plan's RunOptions with those resumes."""

    def __init__(self, args, plan, folder, runs=(), record=layout.RUN_RECORD, checks=()):
        self.args, self.plan, self.folder = args, plan, Path(folder)
        self.runs = list(runs)
        self.record, self.checks = record, list(checks)
        self.resumes = {}
        self._held = contextlib.ExitStack()

    def check_fresh(self):
        """{run folder: whether it resumes}: steps 1 and 4."""
        if not self.runs:
            return {}
        return layout.check_fresh_runs([folder for _, folder in self.runs], self.args.resume,
                                       self.args.overwrite)

    def check_before_writing(self):
        """Step 2; returns the plan's RunOptions with the resumes of step 1."""
        run = self.plan.options.resuming(self.resumes, self.plan.runner)
        resumed = [(folder, settings) for settings, folder in self.runs if self.resumes[folder]]
        options.check_before_writing(replace(self.plan, options=run,
                                             resumed=[*self.plan.resumed, *resumed]))
        for check in self.checks:
            check(self.resumes)
        return run

    def __enter__(self):
        self.resumes = self.check_fresh()
        run = self.check_before_writing()
        with contextlib.ExitStack() as held:
            held.enter_context(layout.owned(self.folder))
            self.check_fresh()  # none began or ended meanwhile
            if self.record:
                layout.write_run_record(self.args, self.folder, self.record)
            self._held = held.pop_all()  # held until the block ends
        return run

    def __exit__(self, *exc_info):
        return self._held.__exit__(*exc_info)
