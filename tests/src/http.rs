//! A JSON client of a running stack's HTTP API, as a device and an operator use it.

use serde_json::Value;

pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// A client of the stack listening on `addr` (`host:port`).
    pub fn new(addr: impl std::fmt::Display) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    /// Status and JSON body (`null` when there is none).
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// Posts `body` as it is (not necessarily JSON).
    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    pub async fn get(&self, path_and_query: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path_and_query}", self.base)))
            .await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.expect("the stack answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}
