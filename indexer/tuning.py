"""Search and index tuning: every size threshold and probe count, in one place, each with why.

The store chooses and trains indexes with the first group, dedup and search read the rest. Tests
shrink a value by patching the name in the module that uses it (`dedup.EXACT_PAIRS_MAX`), which
imports it from here.
"""

# Choosing and training an index (indexer.store)
TRAIN_PER_LIST = 64  # k-means training points per IVF list: quality plateaus well before faiss's 256
FLAT_LIMIT = 50_000  # exact search up to here: ~1.5 ms/query for 384-d at this size
PQ_FROM = 2_000_000  # from here on, 8-bit scalar quantization costs too much memory: use PQ
TARGET_RECALL = 0.95  # nprobe is raised until recall@10 against exact search reaches this...
MIN_AUTO_RECALL = 0.9  # an auto IVF-PQ index below this recall tries IVF-SQ8, then exact search...
FLAT_FALLBACK_MAX = 5_000_000  # ...while the library is this small AND the exact index fits the
# memory budget (indexer.budget: a quarter of the available RAM per kind, or DINOSEEK_INDEX_MEMORY)
# That fallback stores each vector as float16 (FAISS SQfp16), exactly the value the catalog holds,
# so its results are Flat's in half the memory (0.8 GB per kind at 1M x 384). It scans single queries
# faster than Flat (34 vs 145 ms at 1M, 2 cores) and batches slower (no BLAS: 45 vs 237 queries/s).
# Up to EXACT_PAIRS_MAX (below) the fallback stays Flat: dedup range-searches the library's own
# index at that size, where BLAS matters and the memory does not (160 MB per kind at 100k).
EXACT_FALLBACK = "SQfp16"
MAX_PROBE_FRACTION = 8  # ...or until it scans 1/8 of the lists: beyond that the vectors do not
# cluster (random data) and IVF has stopped paying off; the recall reached is logged.

# Building in bounded memory (indexer.build, indexer.ondisk)
BUILD_BLOCK = 65_536  # vectors read from the catalog at a time (100 MB of float32 at 384-d)
TUNE_QUERIES = 200  # sampled queries for nprobe tuning; their exact top-k comes from streaming blocks
# IVF indexes of at least this many vectors keep their inverted lists in a file on disk, memory-mapped
# (faiss OnDiskInvertedLists): search touches only the lists it probes, not the whole library.
ONDISK_FROM = PQ_FROM
# While building an on-disk index, vectors are encoded into an in-memory shard of this many and
# then appended to the file, so the build holds one shard of codes, never the whole library's.
ONDISK_SHARD = 1_000_000
# The build then copies the lists into a file sized to them, each list's slot 1/LIST_HEADROOM larger
# than the list (at least 8 entries where the list has that many): a later run that adds up to that
# share to a list writes in place. A list that outgrows its slot moves to a new one (up to twice its
# entries) in a free tail of 1/LIST_HEADROOM of the file, then at the end of the file, which FAISS
# doubles whenever no free space fits.
LIST_HEADROOM = 8

# Searching (retrieval.api)
# Filtered searches over at most this many images are brute force over the catalog's vectors
# (exact, and no slower than FAISS with an id selector at this size); larger sets go through FAISS.
EXACT_FILTER_LIMIT = 200_000
OVERFETCH = 8  # extra FAISS results per query, to make up for rows deleted since the index loaded

# Near-duplicate search (retrieval.dedup)
# Vectors per block: range-search queries at a time, and rows added at a time to dedup's temporary
# IVF. Memory is bounded by the block and the close pairs it finds, never N^2.
DEDUP_BLOCK = 4096
# IVF lists probed when looking for near duplicates. They sit next to each other, almost always in
# the same list as their query or a neighbouring one, so a handful of lists finds them where a
# nearest-neighbour search over the whole library needs many (measured: benchmarks/dedup.py).
DEDUP_NPROBE = 16
# Above this size an exact (Flat) library index is too slow for an all-pairs range search (N^2):
# candidates then come from a temporary IVF-Flat over the catalog's vectors, probed as above.
EXACT_PAIRS_MAX = 100_000
