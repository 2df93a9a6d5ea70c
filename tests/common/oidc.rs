//! OpenID Connect test helpers: accounts, client registration, and a minimal browser (manual
//! redirects, a cookie jar, form posts) that walks the provider's login and consent pages.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::Digest as _;

use serde_json::Value;

use super::TestServer;

pub const PASSWORD: &str = "correct horse battery staple";

/// Creates an account; returns its DID.
pub async fn sign_up(server: &TestServer, handle: &str) -> String {
    let r = server
        .client
        .post(server.url("/v1/accounts"))
        .json(&serde_json::json!({"handle": handle, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "sign-up of {handle}");
    let body: serde_json::Value = r.json().await.unwrap();
    body["did"].as_str().unwrap().to_owned()
}

/// A first-party token for the account (POST /v1/sessions).
pub async fn first_party_token(server: &TestServer, handle: &str) -> String {
    let r = server
        .client
        .post(server.url("/v1/sessions"))
        .json(&serde_json::json!({"handle": handle, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    body["token"].as_str().unwrap().to_owned()
}

pub struct RegisteredClient {
    pub id: String,
    pub secret: Option<String>,
    pub redirect_uri: String,
}

/// Registers an app through the admin API, with both grant types (refresh tokens with
/// `offline_access`).
pub async fn register_client(server: &TestServer, public: bool, scope: &str) -> RegisteredClient {
    let admin = server.token("did:key:zOperator", &["admin"]);
    let redirect_uri = "http://127.0.0.1:9/cb".to_owned();
    let r = server
        .client
        .post(server.url("/v1/admin/clients"))
        .bearer_auth(admin)
        .json(&serde_json::json!({
            "client_name": "Test App <&>",
            "redirect_uris": [redirect_uri],
            "post_logout_redirect_uris": [format!("{redirect_uri}/logged-out")],
            "scope": scope,
            "token_endpoint_auth_method": if public { "none" } else { "client_secret_basic" },
            "grant_types": ["authorization_code", "refresh_token"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    RegisteredClient {
        id: body["client_id"].as_str().unwrap().to_owned(),
        secret: body["client_secret"].as_str().map(str::to_owned),
        redirect_uri,
    }
}

/// A PKCE verifier and its S256 challenge.
pub fn pkce() -> (String, String) {
    let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let challenge = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// A browser: follows nothing by itself, keeps cookies, posts forms.
pub struct Browser {
    http: reqwest::Client,
    pub cookies: HashMap<String, String>,
}

impl Default for Browser {
    fn default() -> Self {
        Self::new()
    }
}

impl Browser {
    pub fn new() -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep_cookies(&mut self, r: &reqwest::Response) {
        for v in r.headers().get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let pair = v.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            if value.is_empty() || v.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    /// GET; returns status, Location and body.
    pub async fn get(&mut self, url: &str) -> Page {
        let r = self
            .http
            .get(url)
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.page(r).await
    }

    pub async fn post_form(&mut self, url: &str, fields: &[(&str, &str)]) -> Page {
        let r = self
            .http
            .post(url)
            .header("cookie", self.cookie_header())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(fields).unwrap())
            .send()
            .await
            .unwrap();
        self.page(r).await
    }

    async fn page(&mut self, r: reqwest::Response) -> Page {
        self.keep_cookies(&r);
        let status = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = r.text().await.unwrap();
        Page {
            status,
            location,
            body,
        }
    }
}

#[derive(Debug)]
pub struct Page {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

impl Page {
    /// The value of the hidden input `name` (the pages put `name` before `value`), unescaped.
    pub fn hidden(&self, name: &str) -> String {
        let marker = format!("name=\"{name}\" value=\"");
        let start = self.body.find(&marker).unwrap_or_else(|| {
            panic!(
                "no hidden field {name} in page {} {}",
                self.status, self.body
            )
        }) + marker.len();
        let end = self.body[start..].find('"').unwrap() + start;
        html_escape::decode_html_entities(&self.body[start..end]).into_owned()
    }

    /// The query parameters of the redirect target.
    pub fn redirect_params(&self) -> HashMap<String, String> {
        let location = self.location.as_deref().expect("a redirect");
        let query = location.split_once('?').map_or("", |(_, q)| q);
        serde_urlencoded::from_str(query).unwrap()
    }
}

/// Everything an authorization request carries.
pub struct AuthRequest<'a> {
    pub client: &'a RegisteredClient,
    pub scope: &'a str,
    pub challenge: Option<&'a str>,
    pub state: &'a str,
}

impl AuthRequest<'_> {
    pub fn url(&self, server: &TestServer) -> String {
        let mut params = vec![
            ("response_type", "code"),
            ("client_id", self.client.id.as_str()),
            ("redirect_uri", self.client.redirect_uri.as_str()),
            ("scope", self.scope),
            ("state", self.state),
            ("nonce", "n-0S6_WzA2Mj"),
        ];
        if let Some(c) = self.challenge {
            params.push(("code_challenge", c));
            params.push(("code_challenge_method", "S256"));
        }
        server.url(&format!(
            "/oauth/authorize?{}",
            serde_urlencoded::to_string(&params).unwrap()
        ))
    }
}

/// Walks authorize → login → consent (allow) and returns the code.
pub async fn authorize(
    server: &TestServer,
    browser: &mut Browser,
    request: &AuthRequest<'_>,
    handle: &str,
) -> String {
    let mut page = browser.get(&request.url(server)).await;
    if page.status == 200 && page.body.contains("action=\"/oauth/login\"") {
        let interaction = page.hidden("interaction");
        let csrf = page.hidden("csrf");
        page = browser
            .post_form(
                &server.url("/oauth/login"),
                &[
                    ("interaction", &interaction),
                    ("csrf", &csrf),
                    ("handle", handle),
                    ("password", PASSWORD),
                ],
            )
            .await;
    }
    if page.status == 200 && page.body.contains("action=\"/oauth/consent\"") {
        let interaction = page.hidden("interaction");
        let csrf = page.hidden("csrf");
        page = browser
            .post_form(
                &server.url("/oauth/consent"),
                &[
                    ("interaction", &interaction),
                    ("csrf", &csrf),
                    ("decision", "allow"),
                ],
            )
            .await;
    }
    assert_eq!(page.status, 303, "expected the redirect back: {page:?}");
    let back_to_app = format!("{}?", request.client.redirect_uri);
    assert!(
        page.location
            .as_deref()
            .is_some_and(|l| l.starts_with(&back_to_app)),
        "expected the redirect to {back_to_app}: {page:?}"
    );
    let params = page.redirect_params();
    assert_eq!(params.get("state").map(String::as_str), Some(request.state));
    params
        .get("code")
        .unwrap_or_else(|| panic!("no code in {page:?}"))
        .clone()
}

/// POSTs to the token endpoint with the client's credentials (Basic for a confidential client,
/// `client_id` in the body for a public one); returns status and JSON body.
pub async fn token_request(
    server: &TestServer,
    client: &RegisteredClient,
    fields: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    post_as_client(server, client, "/oauth/token", fields).await
}

pub async fn post_as_client(
    server: &TestServer,
    client: &RegisteredClient,
    path: &str,
    fields: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let mut fields: Vec<(&str, &str)> = fields.to_vec();
    let mut req = server.client.post(server.url(path));
    match &client.secret {
        Some(secret) => req = req.basic_auth(&client.id, Some(secret)),
        None => fields.push(("client_id", &client.id)),
    }
    let r = req
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(&fields).unwrap())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// `/oauth/authorize` with exactly these query parameters (for requests the tests malform).
pub fn authorize_url(server: &TestServer, params: &[(&str, &str)]) -> String {
    server.url(&format!(
        "/oauth/authorize?{}",
        serde_urlencoded::to_string(params).unwrap()
    ))
}

/// Redeems `code` at the token endpoint (with the client's redirect URI); returns status and
/// JSON body.
pub async fn redeem_code(
    server: &TestServer,
    client: &RegisteredClient,
    code: &str,
    verifier: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut fields = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", client.redirect_uri.as_str()),
    ];
    if let Some(v) = verifier {
        fields.push(("code_verifier", v));
    }
    token_request(server, client, &fields).await
}

/// Exchanges a refresh token; returns status and JSON body.
pub async fn refresh(
    server: &TestServer,
    client: &RegisteredClient,
    refresh_token: &str,
) -> (u16, serde_json::Value) {
    token_request(
        server,
        client,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
    )
    .await
}

/// The token response of a complete flow: authorize (login and consent as needed, with PKCE)
/// for `scope`, then the code redeemed. Panics unless the redemption succeeds.
pub async fn app_tokens(
    server: &TestServer,
    browser: &mut Browser,
    client: &RegisteredClient,
    scope: &str,
    handle: &str,
) -> serde_json::Value {
    let (verifier, challenge) = pkce();
    let request = AuthRequest {
        client,
        scope,
        challenge: Some(&challenge),
        state: "app-tokens",
    };
    let code = authorize(server, browser, &request, handle).await;
    let (status, body) = redeem_code(server, client, &code, Some(&verifier)).await;
    assert_eq!(status, 200, "code redemption: {body}");
    body
}

/// The scopes the identity tests' apps register and ask for.
pub const SCOPE: &str = "openid profile offline_access read:posts write:posts";
/// The `state` of the identity tests' authorization requests.
pub const STATE: &str = "st-9f2c";
/// RFC 7636 appendix B: a well-formed S256 challenge.
pub const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

/// Sends a request; returns status and JSON body (Null when the body is empty).
pub async fn call(request: reqwest::RequestBuilder) -> (u16, Value) {
    let (status, _, body) = call_with_headers(request).await;
    (status, body)
}

/// [`call`], with the response headers.
pub async fn call_with_headers(
    request: reqwest::RequestBuilder,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (status, headers, body)
}

/// Lists the caller's posts (needs `read:posts`).
pub async fn list_posts(server: &TestServer, token: &str) -> (u16, Value) {
    call(
        server
            .client
            .get(server.url("/v1/docs/posts"))
            .bearer_auth(token),
    )
    .await
}

/// The string member `name` of a JSON answer; panics naming it when absent.
pub fn field<'a>(body: &'a Value, name: &str) -> &'a str {
    body[name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

/// A Vibe `/v1` error: `{"error": {"code", "message"}}` with this status.
#[track_caller]
pub fn assert_api_error(response: &(u16, Value), status: u16, code: &str) {
    let (got, body) = response;
    assert_eq!(
        (*got, body["error"]["code"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    assert!(body["error"]["message"].is_string(), "{body}");
}

/// An OAuth error (RFC 6749 §5.2): `{"error", "error_description"}` with this status.
#[track_caller]
pub fn assert_oauth_error(response: &(u16, Value), status: u16, code: &str) {
    let (got, body) = response;
    assert_eq!(
        (*got, body["error"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    assert!(body["error_description"].is_string(), "{body}");
}

/// A 303 back to the client's redirect URI carrying `error`, the request's state and `iss`.
#[track_caller]
pub fn assert_error_redirect(
    server: &TestServer,
    client: &RegisteredClient,
    page: &Page,
    error: &str,
) {
    assert_eq!(page.status, 303, "{page:?}");
    let location = page.location.as_deref().unwrap();
    assert!(
        location.starts_with(&format!("{}?", client.redirect_uri)),
        "redirects only to the registered URI: {location}"
    );
    let params = page.redirect_params();
    assert_eq!(
        params.get("error").map(String::as_str),
        Some(error),
        "{location}"
    );
    assert_eq!(
        params.get("state").map(String::as_str),
        Some(STATE),
        "{location}"
    );
    assert_eq!(params.get("iss"), Some(&server.base), "{location}");
    assert!(!params.contains_key("code"), "{location}");
}
