"""The real kernel's KSM as an oracle: /sys/kernel/mm/ksm, with every knob saved and restored.
"""
