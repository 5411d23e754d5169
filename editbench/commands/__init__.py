"""The subcommands of ``python -m editbench`` that are not LightningCLI's."""
