"""The torch side: capture, thresholds, dissect and faithfulness."""
