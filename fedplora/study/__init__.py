"""``fedplora study FILE.toml``: a grid of tasks x methods x partitions x seeds, resumable, with one report.

Every cell of the grid is an ordinary run folder (``fedplora run`` writes the same files):
``<out>/cells/<task>/<partition>/<method>/seed<k>/``. The study's state lives in those folders:

* a cell with ``summary.json`` whose ``config.toml`` equals the cell's settings is done and skipped;
* a cell with a checkpoint but no summary is continued from it (``run_simulation(..., resume=True)``);
* a cell whose saved settings differ from what the study file now says stops the study before anything
  runs, with one line naming the cell and the setting (results made with other settings are never mixed);
* a cell that is not started, and whose settings (less MAY_DIFFER) a finished cell of another study listed in
  ``[study] reuse`` already ran, is copied from there instead of being run again (same settings, same
  numbers on the same code and kind of machine), so studies that share cells pay for them once;
* a cell that fails is recorded in ``<out>/study-state.json`` with its error line, the others go on, and
  the next invocation tries it again.

So a study can be stopped (Ctrl-C, SIGTERM, a closed laptop) and continued later, or on another machine
with the same paths, by running the same command. The report (``report.md``, ``table.json``, plots) is
made from the cell folders alone, deterministically: the same cells give byte-identical table.json and
report.md, whatever order or session they ran in; wall times go to ``times.md``. The file format is in
docs/study.md.

The package, in the order a study goes through it:

* ``spec``: the study file's schema and checks, and the grid of cells (Entry, Cell, Study, load_study);
* ``cells``: each cell's state from its folder, conflicts, reuse of other studies' cells, the state file;
* ``estimate`` and ``runner``: the time left, and running the cells (run_study, dry_run, Stop);
* ``parallel`` and ``worker``: several cells at once (``--workers``), each in a process of its own with its
  share of the machine (a GPU, or a share of the CPUs);
* ``summary``: the one summariser over seeds (mean and std; also ``fedplora compare``'s), rows, the reading,
  time to target (also compare's);
* ``report`` and ``plots``: table.json, report.md, times.md and the plots;
* ``cli``: ``fedplora study`` and ``python -m fedplora.study``.

Everything other modules use is importable from ``fedplora.study`` itself.
"""

from .cells import (MAY_DIFFER, STATE_FILE, cell_status, check_conflicts, config_difference, expected_config,
                    finished_summary, read_state, reusable_cells, reuse_cell, select_cells, settings_key,
                    write_state)
from .cli import add_study_parser, main, study_main
from .estimate import START_SECONDS, STEP_SECONDS, cell_steps, estimate, fmt_duration, measured_step_seconds
from .plots import plot_table
from .report import SIGNIFICANT, build_table, markdown_report, round_figures, times_markdown, write_report
from .runner import Stop, dry_run, run_study
from .spec import ENTRY_META, NAME, STUDY_KEYS, STUDY_SETS, TOP_KEYS, Cell, Entry, Study, load_study
from .summary import (NOISE_ALIASES, TARGET_FRACTION, first_reach, format_mean_std, format_reach, mean_std, method_row,
                      noise_keys, over_seeds, reading, spread, time_to_target)

_noise_keys = noise_keys  # its name before the package (tests/test_study.py imports it)

__all__ = [
    "MAY_DIFFER", "STATE_FILE", "cell_status", "check_conflicts", "config_difference", "expected_config",
    "finished_summary", "read_state", "reusable_cells", "reuse_cell", "select_cells", "settings_key", "write_state",
    "add_study_parser", "main", "study_main",
    "START_SECONDS", "STEP_SECONDS", "cell_steps", "estimate", "fmt_duration", "measured_step_seconds",
    "plot_table",
    "SIGNIFICANT", "build_table", "markdown_report", "round_figures", "times_markdown", "write_report",
    "Stop", "dry_run", "run_study",
    "ENTRY_META", "NAME", "STUDY_KEYS", "STUDY_SETS", "TOP_KEYS", "Cell", "Entry", "Study", "load_study",
    "NOISE_ALIASES", "TARGET_FRACTION", "first_reach", "format_mean_std", "format_reach", "mean_std", "method_row",
    "noise_keys", "over_seeds", "reading", "spread", "time_to_target",
]
