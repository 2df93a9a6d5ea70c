-- Clients anyone registered (open dynamic registration, no initial access token). Their redirect
-- URIs are the registrant's choice, so the authorization endpoint does not send a browser to
-- them with an error before the browser's user has approved the app (RFC 9700 §4.11.2).
ALTER TABLE oauth_clients ADD COLUMN registered_openly boolean NOT NULL DEFAULT false;
