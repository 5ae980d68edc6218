"""`ksm-proto estimate`: what KSM would save on this machine's processes and files.
"""
