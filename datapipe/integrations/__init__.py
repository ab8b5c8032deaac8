"""Adapters that let other tools use datapipe's DataModules."""
