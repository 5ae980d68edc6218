"""What users run: the CLI, scenarios, the stress driver, the trace tools, the pytest plugin.
"""
