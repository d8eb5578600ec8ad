"""cirlab.train: LightningModules (one per method), evaluation, the feature cache and the CLI.

Task classes are imported lazily by their module paths (recipes name them in full, e.g.
``cirlab.train.combiner_task.CombinerTask``) so that `import cirlab.train.metrics` stays light.
"""
