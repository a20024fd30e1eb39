//! Push webhooks from GitHub and Gitea.
