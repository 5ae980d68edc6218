"""The KSM scanner's cores and data structures (mm/ksm.c): the scan cursor and
cmp_and_merge_page, try_to_merge_one_page, the stable and unstable trees, the hash index,
the page digest, the shards of several scanners.
"""
