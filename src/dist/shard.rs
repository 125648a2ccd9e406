//! Splitting work between ranks: whole units (a subject's chunk of questions, a HumanEval problem's samples, a
//! prompt) go to the rank with the least work so far, largest first. Every rank computes the same assignment
//! from the same costs, so nothing has to be sent.

/// The rank of each unit, balancing the sum of `costs` per rank (longest-processing-time first; ties go to the
/// lower unit index and the lower rank, so the assignment is the same on every rank).
pub fn assign(costs: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(costs[i]), i));
    let mut load = vec![0usize; world];
    let mut owner = vec![0; costs.len()];
    for i in order {
        let r = (0..world).min_by_key(|&r| (load[r], r)).expect("world ≥ 1");
        load[r] += costs[i];
        owner[i] = r;
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_first_to_the_least_loaded() {
        // 10 → 0; 7 → 1; 3 → 1 (7 < 10); 3 → 0 (a tie goes to the lower rank); 1 → 1 (11 < 13)
        assert_eq!(assign(&[10, 3, 7, 3, 1], 2), vec![0, 1, 1, 0, 1]);
        assert_eq!(assign(&[5, 5], 1), vec![0, 0]);
        assert_eq!(assign(&[], 3), Vec::<usize>::new());
    }
}
