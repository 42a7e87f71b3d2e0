"""From masks to numbers a microscopist reads: particle table, PSD in nm, plots and the HTML report."""

from tgan_ray.analysis.particles import measure_particles, split_touching
from tgan_ray.analysis.plots import plot_grid, plot_overlay, plot_psd, plot_shapes
from tgan_ray.analysis.psd import psd_summary, write_summary
from tgan_ray.analysis.report import write_particles_csv, write_particles_parquet, write_report

__all__ = [
    "measure_particles",
    "plot_grid",
    "plot_overlay",
    "plot_psd",
    "plot_shapes",
    "psd_summary",
    "split_touching",
    "write_particles_csv",
    "write_particles_parquet",
    "write_report",
    "write_summary",
]
