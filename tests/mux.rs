//! The multiplexer alone: links, addresses, discovery, keep-alive, limits.

use std::time::Duration;

use chanserv::{Error, LinkEvent, Listener, Multiplexer, Node, NodeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

async fn echo_server(node: &Node, vaddr: &str) -> tokio::task::JoinHandle<()> {
    let mut l = node.bind(vaddr).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _from)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    })
}

async fn roundtrip(node: &Node, vaddr: &str, msg: &[u8]) -> Result<Vec<u8>, Error> {
    let mut s = node.dial(vaddr, T, &[]).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(chanserv_err)?;
    Ok(out)
}

fn chanserv_err(e: std::io::Error) -> Error {
    match e.into_inner().map(|i| i.downcast::<Error>()) {
        Some(Ok(e)) => *e,
        Some(Err(other)) => Error::Io(std::io::Error::other(other)),
        None => Error::Reset,
    }
}

async fn pair() -> (Node, Node) {
    let a = Node::new();
    let b = Node::new();
    let addr = a.listen("127.0.0.1:0").await.unwrap();
    let id = b.join(addr).await.unwrap();
    assert_eq!(id, a.id());
    (a, b)
}

/// Waits until `node` can route `name` (names travel by the control stream).
async fn until_known(node: &Node, name: &str) {
    for _ in 0..500 {
        match node.dial(name, T, &[]).await {
            Err(Error::NoSuchAddress(_)) => tokio::task::yield_now().await,
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{name} never became known");
}

#[tokio::test]
async fn dial_by_name_over_tcp() {
    let (a, b) = pair().await;
    let _srv = echo_server(&a, "echo").await;
    until_known(&b, "echo").await;
    assert_eq!(roundtrip(&b, "echo", b"hello").await.unwrap(), b"hello");
    // Local dial needs no link.
    assert_eq!(roundtrip(&a, "echo", b"local").await.unwrap(), b"local");
}
