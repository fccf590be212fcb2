"""GLUE dev results of several models x tasks x seeds as the paper's table.

    # fine-tune, then print the table (arguments it does not know go to every run)
    python launch/glue_table.py run --models widenet-e4=runs/wn-e4/final albert=runs/albert/final \
        --tasks mnli sst2 --seeds 1 2 3 --output_dir runs/glue --data_dir glue_data
    # only collect the eval_results.json of finished runs
    python launch/glue_table.py collect runs/glue
"""

from widenet_ds.jobs import glue_grid
from widenet_ds.jobs.cli import main

if __name__ == "__main__":
    main(glue_grid.main)
