//! Rendezvous (highest-random-weight) hashing: which live member should own a partition.
//!
//! Pure and deterministic, so every gateway computes the same answer from the same member list;
//! a join or leave moves only the partitions whose winner changed (about 1/n of them).

/// FNV-1a 64 over `member`, a separator and the partition number, then a 64-bit finaliser
/// (FNV alone clusters for short similar keys).
fn weight(member: &str, partition: u16) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in member.bytes().chain(std::iter::once(0xff)).chain(partition.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64 finaliser
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The member that should own `partition`; ties (never seen in practice) go to the smaller name.
pub fn owner<'a>(partition: u16, members: &'a [String]) -> Option<&'a str> {
    members
        .iter()
        .max_by(|a, b| weight(a, partition).cmp(&weight(b, partition)).then_with(|| b.cmp(a)))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("gw-{i}")).collect()
    }

    #[test]
    fn partitions_spread_over_members_and_a_join_moves_only_what_the_newcomer_wins() {
        let three = members(3);
        let mut counts = [0usize; 3];
        for p in 0..64 {
            let o = owner(p, &three).expect("members");
            counts[three.iter().position(|m| m == o).expect("a member")] += 1;
        }
        assert!(counts.iter().all(|&c| c >= 10), "uneven spread {counts:?}");
        let four = members(4);
        for p in 0..64 {
            let before = owner(p, &three).expect("members");
            let after = owner(p, &four).expect("members");
            assert!(after == before || after == "gw-4", "partition {p} moved from {before} to {after}");
        }
        // Order of the list does not matter.
        let mut shuffled = four.clone();
        shuffled.reverse();
        assert!((0..64).all(|p| owner(p, &four) == owner(p, &shuffled)));
        assert_eq!(owner(3, &[]), None);
    }
}
