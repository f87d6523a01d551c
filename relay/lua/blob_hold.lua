-- An executor about to store an output blob (relay/blobs.py): if it is stored already, whole,
-- keep it at least ARGV[3] ms more and answer 1 (nothing to write); else 0.
return blob_hold(ARGV[1], ARGV[2], ARGV[3]) and 1 or 0
