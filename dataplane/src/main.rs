fn main() {
    let mut hs = vec![];
    for i in 0..2 {
        let h = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(i))
            .spawn(move || async move { println!("core {i} ok"); i })
            .unwrap();
        hs.push(h);
    }
    for h in hs { println!("{:?}", h.join()); }
}
