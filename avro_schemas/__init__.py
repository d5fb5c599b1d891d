"""The schema registry's data: one ``<type>.avsc`` file per event type."""
