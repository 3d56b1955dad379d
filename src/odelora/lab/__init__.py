"""The lab: problems, experiments, a resumable runner, reports and the ``odelora`` CLI."""
