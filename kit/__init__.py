"""The kit's library, grouped by job; the commands at the root call it, and it never imports a command.

    kit.base       errors, fileio, distributed, devices
    kit.settings   resolution, settings_cli
    kit.data       splits, split_writer, dali_loader, cache_loader
    kit.models     archs, exporter
    kit.training   training, engine, checkpoint, runs, metrics
    kit.reporting  run_report, report_page, plots, gradcam, bench_baselines
    kit.sweeps     sweep_space, sweep_report

The design card's modules stay at the root under their names: data_utils, model_utils, augment, presets.
"""
