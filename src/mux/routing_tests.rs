//! The routing table in a simulated mesh: ROUTES passed between tables by hand until
//! nothing changes, links cut at random, and the routes checked against the graph.

use super::*;

/// A mesh of tables: node `i` has id `i + 1`, binds the name `s<i>`, and is linked
/// to the nodes of its edges.
struct Mesh {
    tables: Vec<Routing>,
    edges: BTreeSet<(usize, usize)>,
    envs: Vec<String>,
}

impl Mesh {
    fn new(n: usize, edges: &[(usize, usize)]) -> Self {
        let mut m = Mesh {
            tables: (0..n).map(|_| Routing::default()).collect(),
            edges: BTreeSet::new(),
            envs: vec![String::new(); n],
        };
        for e in edges {
            m.link(e.0, e.1);
        }
        m
    }

    fn id(i: usize) -> NodeId {
        i as NodeId + 1
    }

    fn names(i: usize) -> BTreeSet<String> {
        [format!("s{i}")].into_iter().collect()
    }

    fn link(&mut self, a: usize, b: usize) {
        self.edges.insert((a.min(b), a.max(b)));
    }

    fn cut(&mut self, a: usize, b: usize) {
        self.edges.remove(&(a.min(b), a.max(b)));
        self.tables[a].forget(Self::id(b));
        self.tables[b].forget(Self::id(a));
    }

    fn peers(&self, i: usize) -> Vec<usize> {
        let other = |&(a, b): &(usize, usize)| match (a == i, b == i) {
            (true, _) => Some(b),
            (_, true) => Some(a),
            _ => None,
        };
        self.edges.iter().filter_map(other).collect()
    }

    /// Exchanges ROUTES until no table changes; returns the rounds it took.
    fn converge(&mut self) -> usize {
        for round in 0..100 {
            let mut changed = false;
            for i in 0..self.tables.len() {
                let linked = self
                    .peers(i)
                    .into_iter()
                    .map(|p| (Self::id(p), Self::names(p)));
                changed |= self.tables[i].recompute(Self::id(i), &linked.collect());
            }
            for i in 0..self.tables.len() {
                for p in self.peers(i) {
                    let ads = self.tables[p].ads_for(Self::id(p), &self.envs[p], Self::id(i));
                    self.tables[i].set_ads(Self::id(p), ads);
                }
            }
            if !changed && round > 0 {
                return round;
            }
        }
        panic!("routes did not converge in 100 rounds");
    }

    /// Shortest hop counts from `from` (breadth first over the edges).
    fn distances(&self, from: usize) -> BTreeMap<usize, usize> {
        let mut d = BTreeMap::from([(from, 0)]);
        let mut frontier = vec![from];
        while !frontier.is_empty() {
            let mut next = Vec::new();
            for n in frontier {
                for p in self.peers(n) {
                    if !d.contains_key(&p) {
                        d.insert(p, d[&n] + 1);
                        next.push(p);
                    }
                }
            }
            frontier = next;
        }
        d
    }

    /// Every table has a shortest route to every node it can reach and none to the
    /// others, and following next hops from anywhere arrives without a loop.
    fn check(&self) {
        for i in 0..self.tables.len() {
            let want = self.distances(i);
            let best = self.tables[i].best();
            for (dest, r) in best {
                let d = *dest as usize - 1;
                assert_eq!(Some(&r.hops()), want.get(&d), "node {i} to {d}: {r:?}");
                assert_eq!(r.names, Self::names(d));
                // Walk the next hops.
                let (mut at, mut steps) = (i, 0);
                while at != d {
                    let r = self.tables[at]
                        .to(*dest)
                        .expect("a hop on the way has a route");
                    let next = r.next() as usize - 1;
                    assert!(
                        self.peers(at).contains(&next),
                        "{at} is not linked to {next}"
                    );
                    at = next;
                    steps += 1;
                    assert!(steps <= HOP_LIMIT, "loop from {i} to {d}");
                }
            }
            assert_eq!(best.len(), want.len() - 1, "node {i} reaches {want:?}");
        }
    }
}

#[test]
fn a_chain_reaches_its_far_end_and_forgets_it_when_cut() {
    let mut m = Mesh::new(3, &[(0, 1), (1, 2)]);
    m.converge();
    m.check();
    let to_c = m.tables[0].to(3).unwrap();
    assert_eq!((to_c.next(), to_c.hops()), (2, 2));
    m.cut(1, 2);
    m.converge();
    m.check();
    assert!(m.tables[0].to(3).is_none(), "a withdrawn route is gone");
}

#[test]
fn a_second_path_takes_over_when_the_first_is_cut() {
    // A(0) - B(1) - C(2), and A - D(3) - C.
    let mut m = Mesh::new(4, &[(0, 1), (1, 2), (0, 3), (3, 2)]);
    m.converge();
    m.check();
    assert_eq!(
        m.tables[0].to(3).unwrap().next(),
        2,
        "ties go to the lower id"
    );
    m.cut(0, 1);
    m.converge();
    m.check();
    assert_eq!(m.tables[0].to(3).unwrap().path, [4, 3]);
}

#[test]
fn random_cuts_in_a_mesh_leave_no_loop() {
    // A 6-node mesh, cut link by link in a pseudo-random order.
    let all: Vec<(usize, usize)> = (0..6)
        .flat_map(|a| (a + 1..6).map(move |b| (a, b)))
        .filter(|(a, b)| (a * 7 + b * 3) % 4 != 0)
        .collect();
    let mut m = Mesh::new(6, &all);
    m.converge();
    m.check();
    let mut order = all.clone();
    let mut x: u64 = 0x9e37_79b9;
    for i in (1..order.len()).rev() {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        order.swap(i, (x >> 33) as usize % (i + 1));
    }
    for (a, b) in order {
        m.cut(a, b);
        m.converge();
        m.check();
    }
    assert!(m.tables.iter().all(|t| t.best().is_empty()));
}

#[test]
fn a_long_chain_stops_at_the_hop_limit() {
    let n = HOP_LIMIT + 4;
    let edges: Vec<_> = (0..n - 1).map(|i| (i, i + 1)).collect();
    let mut m = Mesh::new(n, &edges);
    m.converge();
    let far = m.tables[0].best().keys().max().copied();
    assert_eq!(
        far,
        Some(HOP_LIMIT as NodeId + 1),
        "{HOP_LIMIT} hops and no more"
    );
}

#[test]
fn names_of_another_environment_are_not_seen() {
    let mut m = Mesh::new(3, &[(0, 1), (1, 2)]);
    m.envs[2] = "prod".into();
    m.converge();
    m.converge();
    let seen = m.tables[0].names_in("");
    assert!(seen.contains_key(&2) && !seen.contains_key(&3), "{seen:?}");
    assert!(m.tables[0].to(3).is_some(), "the node is still reached");
    assert_eq!(
        m.tables[0].names_in("prod").keys().collect::<Vec<_>>(),
        [&3]
    );
}

#[test]
fn entries_with_loops_or_of_another_sender_are_dropped() {
    let mut t = Routing::default();
    let ad = |path: &[NodeId]| RouteAd {
        path: path.to_vec(),
        ..RouteAd::default()
    };
    let linked = BTreeMap::from([(2, BTreeSet::new())]);
    t.set_ads(
        2,
        vec![ad(&[2, 1, 5]), ad(&[3, 6]), ad(&[2, 7, 7]), ad(&[2, 8])],
    );
    t.recompute(1, &linked);
    assert_eq!(t.best().keys().copied().collect::<Vec<_>>(), [2, 8]);
}
