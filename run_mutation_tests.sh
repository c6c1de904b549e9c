#!/usr/bin/env bash
# Mutation testing (docs/development.md): mutmut mutates the functions where a wrong value
# hides, one small edit at a time, and runs the value tests of pyproject.toml's [tool.mutmut]
# against each mutant. Needs requirements-dev.txt. Then: mutmut results; mutmut show NAME.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf mutants
export OMP_NUM_THREADS=1  # torch in a forked child: one thread, or a forked OpenMP pool hangs
mutmut run --max-children "${MUTMUT_CHILDREN:-2}" \
    "metrics.x_*" "atomic.*" \
    "spider_metrics.x__*" \
    "instances.x_number_levels*" "instances.x__half_level*" \
    "train.x_learning_rate_factor*" "train.x_match_state_layout*" \
    "vertebraeseg.x_normalise*" "vertebraeseg.x__otsu_threshold*" \
    "vertebraeseg.x_grid_geometry*" "vertebraeseg.x_predictions_to_scan*" \
    "vertebraeseg.x_labels_to_scan*" \
    "test_unet.x_overlap_and_distances*" "test_unet.x__surface_distances*" \
    "test_unet.x_remove_small_components*" "test_unet.x_case_metrics*" \
    "steps.xǁSegmentationLossǁ*" \
    "measure.x_measure_levels*" "measure.x__height*" "measure.x__thin_axis*" \
    "measure.x__canal_at*" "measure.xǁ_Frameǁ*"
